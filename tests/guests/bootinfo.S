/*
 * bootinfo.S: prints what the guest was handed at boot, then leaves.
 *
 * Built three times:
 *   bootinfo.elf        PVH note -> entered at pvh_entry (32-bit, EBX =
 *                       struct hvm_start_info);
 *   bootinfo-linux.elf  -DBOOT_LINUX, no PVH note -> entered at the ELF
 *                       entry _start with the Linux 64-bit boot protocol
 *                       (long mode, RSI = struct boot_params);
 *   bootinfo-bzimage.elf  -DBOOT_LINUX -DBZIMAGE: as bootinfo-linux, with
 *                       _start at 0x100200; build.rs turns it into
 *                       bootinfo.bzimage (entered the same way).
 *
 * Both entries only record the boot pointer, switch to our own page tables
 * (identity map of the first 4 GiB with 2 MiB pages) and continue in the
 * shared 64-bit `main`, which parses the boot structure and prints:
 *
 *   boot: pvh | boot: linux
 *   cmdline: <command line>
 *   e820: <addr %016x> <size %016x> <type %u>          (one per entry)
 *   module: <paddr %016x> <size %016x>                 (only if present)
 *   cpuid1: eax=%08x ebx=%08x ecx=%08x edx=%08x        (leaf 1)
 *   cpuid7: ebx=%08x ecx=%08x edx=%08x                 (leaf 7, subleaf 0)
 *   cpuidb0: eax=%08x ebx=%08x ecx=%08x edx=%08x       (leaf 0xb, subleaf 0)
 *   cpuidb1: eax=%08x ebx=%08x ecx=%08x edx=%08x       (leaf 0xb, subleaf 1)
 *   hypervisor: <leaf 0x40000000 ebx,ecx,edx as text>
 *   mptable: cpus=N apic_ids=a,b,.. bsp=B ioapic=0|1   (or "mptable: none")
 *   bootinfo: done
 */
#include "common.S"

#define PVH_MAGIC	0x336ec578
#define MAX_MAP		128	/* memory map entries printed at most */
#define MAX_CMDLINE	4096	/* command line bytes printed at most */

#ifndef BOOT_LINUX
	PVH_NOTE pvh_entry
#endif

/* ------------------------------------------------------------------ */
/* PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info  */
/* ------------------------------------------------------------------ */
	.text
	.code32
pvh_entry:
	cli
	cld
	mov $stack_top, %esp
	mov %ebx, boot_ptr
	movl $0, boot_ptr + 4
	movl $0, boot_kind		/* 0 = PVH */
	movl $0, boot_kind + 4

	/* Switch to long mode: GDT, PAE, CR3, EFER.LME, paging, far jump. */
	lgdt gdt_desc
	mov %cr4, %eax
	or $0x20, %eax			/* CR4.PAE */
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx		/* EFER */
	rdmsr
	or $0x100, %eax			/* EFER.LME */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax		/* CR0.PG | CR0.PE */
	mov %eax, %cr0
	ljmp $0x08, $pvh_long

	.code64
pvh_long:
	mov $0x10, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov $stack_top, %rsp
	jmp main

/* ------------------------------------------------------------------ */
/* Linux 64-bit boot protocol entry (ELF e_entry): RSI = boot_params   */
/* ------------------------------------------------------------------ */
#ifdef BZIMAGE
	/*
	 * bootinfo.bzimage: build.rs wraps the flat image of this build
	 * (loaded at 0x100000) in a bzImage, and the 64-bit boot protocol
	 * enters a bzImage at its load address + 0x200.  The .text of this
	 * object is the first thing at 0x100000 (guest.ld), so this puts
	 * _start at 0x100200; build.rs checks e_entry.
	 */
	.org 0x200
#endif
	.globl _start
_start:
	cli
	cld
	mov $stack_top, %rsp
	mov %rsi, boot_ptr(%rip)
	movq $1, boot_kind(%rip)	/* 1 = Linux */
	mov $pml4, %eax			/* our own 4 GiB identity map */
	mov %rax, %cr3

/* ------------------------------------------------------------------ */
/* Shared 64-bit code                                                  */
/* ------------------------------------------------------------------ */
main:
	cmpq $0, boot_kind(%rip)
	jne 1f
	call parse_pvh
	lea str_boot_pvh(%rip), %rsi
	jmp 2f
1:	call parse_linux
	lea str_boot_linux(%rip), %rsi
2:	call puts

	/* cmdline: ... */
	lea str_cmdline(%rip), %rsi
	call puts
	mov cmdline(%rip), %rsi
	test %rsi, %rsi
	jz 4f
	mov $MAX_CMDLINE, %ecx
	mov $COM1, %dx
3:	movb (%rsi), %al
	test %al, %al
	jz 4f
	outb %al, %dx
	inc %rsi
	dec %ecx
	jnz 3b
4:	call newline

	/* e820: one line per memory map entry (PVH: 24-byte entries,
	 * Linux: 20-byte entries; both have addr, size, type at 0, 8, 16). */
	mov map_ptr(%rip), %r12
	mov map_count(%rip), %r13
	mov map_stride(%rip), %r14
	cmp $MAX_MAP, %r13
	jbe 5f
	mov $MAX_MAP, %r13
5:	test %r13, %r13
	jz 6f
	lea str_e820(%rip), %rsi
	call puts
	mov (%r12), %rdi
	call puthex16
	call space
	mov 8(%r12), %rdi
	call puthex16
	call space
	movl 16(%r12), %edi
	call putdec
	call newline
	add %r14, %r12
	dec %r13
	jmp 5b
6:
	/* module: initramfs, if any */
	cmpq $0, mod_valid(%rip)
	je 7f
	lea str_module(%rip), %rsi
	call puts
	mov mod_addr(%rip), %rdi
	call puthex16
	call space
	mov mod_size(%rip), %rdi
	call puthex16
	call newline
7:
	/* CPUID as seen by guest ring 0 */
	mov $1, %eax
	xor %ecx, %ecx
	lea str_cpuid1(%rip), %rsi
	call cpuid_eax_edx
	mov $7, %eax
	xor %ecx, %ecx
	lea str_cpuid7(%rip), %rsi
	call cpuid_ebx_edx
	mov $0xb, %eax
	xor %ecx, %ecx
	lea str_cpuidb0(%rip), %rsi
	call cpuid_eax_edx
	mov $0xb, %eax
	mov $1, %ecx
	lea str_cpuidb1(%rip), %rsi
	call cpuid_eax_edx

	/* hypervisor: signature of leaf 0x40000000 (ebx, ecx, edx), printed
	 * up to the first NUL, non-printable bytes as '.' */
	mov $0x40000000, %eax
	xor %ecx, %ecx
	cpuid
	mov %ebx, sig(%rip)
	mov %ecx, sig + 4(%rip)
	mov %edx, sig + 8(%rip)
	lea str_hypervisor(%rip), %rsi
	call puts
	lea sig(%rip), %rsi
	mov $12, %ecx
8:	movb (%rsi), %al
	test %al, %al
	jz 10f
	cmp $0x20, %al
	jb 9f
	cmp $0x7e, %al
	jbe 91f
9:	mov $'.', %al
91:	call putc
	inc %rsi
	dec %ecx
	jnz 8b
10:	call newline

	call mptable

	lea str_done(%rip), %rsi
	call puts
	LEAVE

/* parse_pvh: fill cmdline/map/module from struct hvm_start_info. */
parse_pvh:
	mov boot_ptr(%rip), %rbx
	cmpl $PVH_MAGIC, (%rbx)
	jne bad_magic
	mov 24(%rbx), %rax		/* cmdline_paddr */
	mov %rax, cmdline(%rip)
	movq $24, map_stride(%rip)
	cmpl $0, 4(%rbx)		/* version 0 has no memmap fields */
	je 1f
	mov 40(%rbx), %rax		/* memmap_paddr */
	mov %rax, map_ptr(%rip)
	movl 48(%rbx), %eax		/* memmap_entries */
	mov %rax, map_count(%rip)
1:	cmpl $0, 12(%rbx)		/* nr_modules */
	je 2f
	mov 16(%rbx), %rsi		/* modlist_paddr: first entry */
	mov (%rsi), %rax		/* paddr */
	mov %rax, mod_addr(%rip)
	mov 8(%rsi), %rax		/* size */
	mov %rax, mod_size(%rip)
	movq $1, mod_valid(%rip)
2:	ret

bad_magic:
	lea str_bad_magic(%rip), %rsi
	call puts
	LEAVE

/* parse_linux: fill cmdline/map/module from struct boot_params. */
parse_linux:
	mov boot_ptr(%rip), %rbx
	movl 0x228(%rbx), %eax		/* hdr.cmd_line_ptr */
	movl 0x0c8(%rbx), %edx		/* ext_cmd_line_ptr */
	shl $32, %rdx
	or %rdx, %rax
	mov %rax, cmdline(%rip)
	lea 0x2d0(%rbx), %rax		/* e820_table */
	mov %rax, map_ptr(%rip)
	movzbl 0x1e8(%rbx), %eax	/* e820_entries */
	mov %rax, map_count(%rip)
	movq $20, map_stride(%rip)
	movl 0x21c(%rbx), %eax		/* hdr.ramdisk_size */
	movl 0x0c4(%rbx), %edx		/* ext_ramdisk_size */
	shl $32, %rdx
	or %rdx, %rax
	test %rax, %rax
	jz 1f
	mov %rax, mod_size(%rip)
	movl 0x218(%rbx), %eax		/* hdr.ramdisk_image */
	movl 0x0c0(%rbx), %edx		/* ext_ramdisk_image */
	shl $32, %rdx
	or %rdx, %rax
	mov %rax, mod_addr(%rip)
	movq $1, mod_valid(%rip)
1:	ret

/*
 * mptable: find the MP floating pointer ("_MP_") on 16-byte boundaries in
 * 0x9fc00..0xa0000, then 0xf0000..0x100000; walk the "PCMP" config table.
 * Counts enabled processor entries (flags bit 0) and lists their APIC ids.
 * Clobbers %rbx and %r12..%r15 (nothing needs them afterwards).
 */
mptable:
	mov $0x9fc00, %rsi
	mov $0xa0000, %rdi
	call mp_find
	jnz 1f
	mov $0xf0000, %rsi
	mov $0x100000, %rdi
	call mp_find
	jz mp_none
1:	movl 4(%rsi), %ebx		/* physptr of the config table */
	test %ebx, %ebx
	jz mp_none
	cmpl $0x504d4350, (%rbx)	/* "PCMP" */
	jne mp_none
	/*
	 * Walk the entries like Linux does, up to the base table length
	 * (offset 4), and also stop after the entry count (offset 0x22)
	 * when that is nonzero: qboot (QEMU microvm firmware) leaves the
	 * entry count 0 and only fills in the length.
	 */
	movzwl 4(%rbx), %r15d		/* base table length */
	add %rbx, %r15			/* end of the base table */
	movzwl 0x22(%rbx), %r13d	/* entry count */
	test %r13d, %r13d
	jnz 11f
	mov $0x10000, %r13d		/* 0: bounded by the length only */
11:	lea 44(%rbx), %r12		/* first entry, after the 44-byte header */
	xor %r14d, %r14d		/* enabled cpus found */
	movq $-1, mp_bsp(%rip)
	movq $0, mp_ioapic(%rip)
2:	test %r13, %r13
	jz 5f
	cmp %r15, %r12
	jae 5f
	movzbl (%r12), %eax		/* entry type */
	test %eax, %eax
	jnz 4f
	/* processor entry, 20 bytes */
	movzbl 1(%r12), %eax		/* local APIC id */
	movzbl 3(%r12), %edx		/* flags */
	test $1, %dl			/* enabled? */
	jz 3f
	cmp $256, %r14
	jae 3f
	lea mp_ids(%rip), %rcx
	mov %al, (%rcx, %r14)
	inc %r14
	test $2, %dl			/* bootstrap processor? */
	jz 3f
	mov %rax, mp_bsp(%rip)
3:	add $20, %r12
	dec %r13
	jmp 2b
4:	cmp $2, %eax			/* IOAPIC entry? */
	jne 41f
	movq $1, mp_ioapic(%rip)
41:	add $8, %r12			/* every other entry type is 8 bytes */
	dec %r13
	jmp 2b

5:	lea str_mp_cpus(%rip), %rsi
	call puts
	mov %r14, %rdi
	call putdec
	lea str_mp_ids(%rip), %rsi
	call puts
	xor %r13d, %r13d
6:	cmp %r14, %r13
	jae 7f
	test %r13, %r13
	jz 61f
	mov $',', %al
	call putc
61:	lea mp_ids(%rip), %rcx
	movzbl (%rcx, %r13), %edi
	call putdec
	inc %r13
	jmp 6b
7:	lea str_mp_bsp(%rip), %rsi
	call puts
	mov mp_bsp(%rip), %rdi
	cmp $-1, %rdi
	jne 8f
	lea str_none(%rip), %rsi
	call puts
	jmp 9f
8:	call putdec
9:	lea str_mp_ioapic(%rip), %rsi
	call puts
	mov mp_ioapic(%rip), %rdi
	call putdec
	jmp newline

mp_none:
	lea str_mp_none(%rip), %rsi
	jmp puts

/* mp_find: scan [%rsi, %rdi) in 16-byte steps for "_MP_".
 * Returns ZF clear and %rsi = address if found, ZF set if not. */
mp_find:
1:	cmp %rdi, %rsi
	jae 3f
	cmpl $0x5f504d5f, (%rsi)	/* "_MP_" */
	je 2f
	add $16, %rsi
	jmp 1b
2:	or $1, %eax			/* clears ZF */
	ret
3:	xor %eax, %eax			/* sets ZF */
	ret

/* cpuid_eax_edx: %rsi = line prefix, %eax/%ecx = leaf/subleaf.
 * Prints "<prefix> eax=.. ebx=.. ecx=.. edx=..\n". */
cpuid_eax_edx:
	push %rsi
	cpuid
	pop %rsi
	call save_regs
	call puts
	lea str_eax(%rip), %rsi
	call puts
	mov r_eax(%rip), %edi
	call puthex8
	jmp print_ebx_edx

/* cpuid_ebx_edx: like cpuid_eax_edx without eax. */
cpuid_ebx_edx:
	push %rsi
	cpuid
	pop %rsi
	call save_regs
	call puts
print_ebx_edx:
	lea str_ebx(%rip), %rsi
	call puts
	mov r_ebx(%rip), %edi
	call puthex8
	lea str_ecx(%rip), %rsi
	call puts
	mov r_ecx(%rip), %edi
	call puthex8
	lea str_edx(%rip), %rsi
	call puts
	mov r_edx(%rip), %edi
	call puthex8
	jmp newline

save_regs:
	mov %eax, r_eax(%rip)
	mov %ebx, r_ebx(%rip)
	mov %ecx, r_ecx(%rip)
	mov %edx, r_edx(%rip)
	ret

/* ---- serial output helpers; clobber %rax, %rcx, %rdx, %rsi, %rdi ---- */

/* puts: NUL-terminated string at %rsi. */
puts:
	mov $COM1, %dx
1:	movb (%rsi), %al
	test %al, %al
	jz 2f
	outb %al, %dx
	inc %rsi
	jmp 1b
2:	ret

/* putc: the character in %al (clobbers %dx only). */
putc:
	mov $COM1, %dx
	outb %al, %dx
	ret

space:
	mov $' ', %al
	jmp putc

newline:
	mov $'\n', %al
	jmp putc

/* puthex16 / puthex8: %rdi as 16 / 8 lowercase hex digits. */
puthex16:
	mov $16, %esi
	jmp puthex
puthex8:
	mov $8, %esi
puthex:					/* %esi = number of digits */
	mov $COM1, %dx
1:	dec %esi
	lea (, %rsi, 4), %ecx
	mov %rdi, %rax
	shr %cl, %rax
	and $0xf, %eax
	lea hexdigits(%rip), %rcx
	movb (%rcx, %rax), %al
	outb %al, %dx
	test %esi, %esi
	jnz 1b
	ret

/* putdec: %rdi in decimal. */
putdec:
	mov %rdi, %rax
	lea decbuf_end(%rip), %rsi
	movb $0, (%rsi)
	mov $10, %ecx
1:	xor %edx, %edx
	div %rcx
	add $'0', %dl
	dec %rsi
	movb %dl, (%rsi)
	test %rax, %rax
	jnz 1b
	jmp puts

/* ------------------------------------------------------------------ */
	.section .rodata
hexdigits:	.ascii "0123456789abcdef"
str_boot_pvh:	.asciz "boot: pvh\n"
str_boot_linux:	.asciz "boot: linux\n"
str_bad_magic:	.asciz "bootinfo: bad hvm_start_info magic\n"
str_cmdline:	.asciz "cmdline: "
str_e820:	.asciz "e820: "
str_module:	.asciz "module: "
str_cpuid1:	.asciz "cpuid1:"
str_cpuid7:	.asciz "cpuid7:"
str_cpuidb0:	.asciz "cpuidb0:"
str_cpuidb1:	.asciz "cpuidb1:"
str_eax:	.asciz " eax="
str_ebx:	.asciz " ebx="
str_ecx:	.asciz " ecx="
str_edx:	.asciz " edx="
str_hypervisor:	.asciz "hypervisor: "
str_mp_cpus:	.asciz "mptable: cpus="
str_mp_ids:	.asciz " apic_ids="
str_mp_bsp:	.asciz " bsp="
str_mp_ioapic:	.asciz " ioapic="
str_mp_none:	.asciz "mptable: none\n"
str_none:	.asciz "none"
str_done:	.asciz "bootinfo: done\n"

	.balign 8
gdt:
	.quad 0				/* null */
	.quad 0x00af9a000000ffff	/* 0x08: 64-bit code, ring 0 */
	.quad 0x00cf92000000ffff	/* 0x10: flat data */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

/* Page tables: identity map of 0..4 GiB with 2 MiB pages (RW, present). */
	.data
	.balign 4096
pml4:
	.quad pdpt + 0x3
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + 0x3
	.quad pd + 0x1000 + 0x3
	.quad pd + 0x2000 + 0x3
	.quad pd + 0x3000 + 0x3
	.fill 508, 8, 0
pd:
	.set page, 0
	.rept 2048
	.quad page + 0x83		/* present, writable, 2 MiB page */
	.set page, page + 0x200000
	.endr

/* ------------------------------------------------------------------ */
	.bss
	.balign 8
boot_ptr:	.skip 8		/* hvm_start_info or boot_params address */
boot_kind:	.skip 8		/* 0 = PVH, 1 = Linux */
cmdline:	.skip 8
map_ptr:	.skip 8
map_count:	.skip 8
map_stride:	.skip 8
mod_addr:	.skip 8
mod_size:	.skip 8
mod_valid:	.skip 8
mp_bsp:		.skip 8
mp_ioapic:	.skip 8
r_eax:		.skip 4
r_ebx:		.skip 4
r_ecx:		.skip 4
r_edx:		.skip 4
sig:		.skip 12
mp_ids:		.skip 256
decbuf:		.skip 23
decbuf_end:	.skip 1
