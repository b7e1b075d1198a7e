/*
 * pci.S: finds the passthrough PCI device (Mellanox ConnectX VF 15b3:101c)
 * on bus 0 and drives it end to end: config space through mechanism #1
 * and ECAM, BAR0 sizing and enabling, MMIO RAM in BAR0, and MSI-X
 * interrupts through the local APIC.  PVH entry; the integration test of
 * the VMM's PCI root complex and VFIO passthrough boots it against a fake
 * device.
 *
 *   1. scans 00:00.0..00:1f.0 with mechanism #1 (ports 0xcf8/0xcfc) and
 *      prints "pci: 00:DD.0 VVVV:DDDD class CCCCCC" for each function 0
 *      that answers (vendor neither 0xffff nor 0);
 *   2. takes the first 15b3:101c device ("pci: no passthrough device" and
 *      leaves if there is none) and reads its id again through ECAM at
 *      0xe0000000: "ecam: 00:DD.0 VVVV:DDDD" ("ecam: mismatch": leaves);
 *   3. sizes BAR0 (memory decode off, write ~0, read back, restore), turns
 *      on memory space and bus master: "bar0: addr=XXXXXXXX size=XXXXXXXX"
 *      (a 64-bit BAR must have a zero high half: "bar0: above 4G");
 *   4. walks the capability list to MSI-X:
 *      "msix: vectors=N table=barB+XXXXXXXX pba=barB+XXXXXXXX";
 *   5. writes and reads back a pattern in BAR0 0x1000-0x1fff and
 *      0x8000-0x8fff: "bar0: rw ok" (or the first mismatching offset);
 *   6. loads an IDT (vector 0x40 counts MSI-X interrupts, every other
 *      vector counts strays; the handlers return without iret, see
 *      IRET32), masks the 8259s, enables the LAPIC and programs MSI-X
 *      entry 0 for vector 0x40 to this CPU;
 *   7. 100 rounds: response = 0, doorbell = N, wait with interrupts on
 *      (no hlt, ~2 s TSC bound) for interrupt N, check response == N + 1:
 *      "msix: 100 interrupts ok";
 *   8. masks entry 0, rings once more, checks that the response arrives
 *      without an interrupt, unmasks and expects the held interrupt:
 *      "msix: masked vector held, delivered on unmask"; meanwhile the PBA
 *      shows it pending, and once delivered it is not: masked again, the
 *      PBA bit reads 0 and unmasking delivers nothing:
 *      "msix: PBA pending while held, clear once delivered";
 *   9. "pci: N stray interrupts" if any other vector fired (after 10 ms
 *      more with interrupts on), "pci: done",
 *      and leaves.
 * Every failure prints one line saying what went wrong and leaves.
 *
 * Paging stays off, so BAR0, ECAM and the LAPIC are addressed physically.
 * Only simple integer instructions (see common.S).
 */
#include "common.S"
#include "util32.S"

#define PCI_ADDR	0xcf8		/* mechanism #1 address register */
#define PCI_DATA	0xcfc		/* data window 0xcfc-0xcff */
#ifndef ECAM_BASE	/* (-D overrides are only for trying it under QEMU q35) */
#define ECAM_BASE	0xe0000000	/* 00:DD.0 reg R at ECAM_BASE + (DD << 15) + R */
#endif

#define PCI_ID		0x00		/* vendor (15:0) | device (31:16) */
#define PCI_COMMAND	0x04		/* command (15:0) | status (31:16) */
#define PCI_CLASS	0x08		/* revision (7:0) | class code (31:8) */
#define PCI_BAR0	0x10
#define PCI_BAR1	0x14
#define PCI_CAP_PTR	0x34
#define CMD_MEMORY	(1 << 1)
#define CMD_MASTER	(1 << 2)
#define STATUS_CAP_LIST	(1 << (16 + 4))	/* status bit 4, seen in the dword */
#define CAP_ID_MSIX	0x11

#ifndef PT_ID
#define PT_ID		0x101c15b3	/* 15b3:101c as the id dword reads */
#endif

/* BAR0 layout of the passthrough device */
#define BAR_DOORBELL	0x0000
#define BAR_RESPONSE	0x0004
#define BAR_MIN_SIZE	0x10000		/* what this guest touches */

/* MSI-X message control (cap + 2) and table entries */
#define MSIX_ENABLE	(1 << 15)
#define MSIX_FUNC_MASK	(1 << 14)
#define MSIX_ADDR_LO	0
#define MSIX_ADDR_HI	4
#define MSIX_DATA	8
#define MSIX_VCTRL	12		/* bit 0: vector masked */

#define LAPIC_BASE	0xfee00000
#define LAPIC_ID	(LAPIC_BASE + 0x020)
#define LAPIC_EOI	(LAPIC_BASE + 0x0b0)
#define LAPIC_SVR	(LAPIC_BASE + 0x0f0)

#define MSI_VECTOR	0x40
#define ROUNDS		100
#define TIMEOUT_MS	2000
#define QUIET_MS	100		/* how long a masked vector must stay quiet */

	PVH_NOTE _start

	.text
	.code32
	.globl _start
_start:				/* PVH entry: 32-bit protected mode, paging off */
	cli
	cld
	mov $stack_top, %esp
	call tsc_init
	movl $0, irq_count
	movl $0, stray_count
	movl $-1, pt_dev

	/* ---- 1. scan bus 0, function 0 of every device, mechanism #1 ---- */
	xor %ebx, %ebx			/* device number */
scan:
	mov $PCI_ID, %ecx
	call cfg_read
	cmp $0xffff, %ax		/* nobody home */
	je scan_next
	test %ax, %ax			/* vendor 0 is not valid either */
	jz scan_next
	mov %eax, %edi			/* the id dword */
	cmp $PT_ID, %edi
	jne 1f
	cmpl $-1, pt_dev		/* the first one is ours */
	jne 1f
	mov %ebx, pt_dev
	mov %edi, pt_id
1:	mov $msg_pci, %esi
	call puts32
	call put_dev
	mov $msg_class, %esi
	call puts32
	mov $PCI_CLASS, %ecx
	call cfg_read
	shr $8, %eax
	mov $6, %ecx
	call puthex32
	call newline
scan_next:
	inc %ebx
	cmp $32, %ebx
	jb scan

	/* ---- 2. the passthrough device, and its id through ECAM ---- */
	mov pt_dev, %ebx
	cmp $-1, %ebx
	jne 1f
	mov $msg_no_pt, %esi
	jmp fail
1:	mov %ebx, %eax
	shl $15, %eax
	mov ECAM_BASE + PCI_ID(%eax), %edi
	mov $msg_ecam, %esi
	call puts32
	call put_dev
	call newline
	cmp pt_id, %edi
	je bar_size
	mov $msg_ecam_bad, %esi
	jmp fail

	/* ---- 3. size and enable BAR0 (%ebx = device throughout) ---- */
bar_size:
	mov $PCI_COMMAND, %ecx
	call cfg_read
	mov %ax, saved_cmd
	and $~CMD_MEMORY, %eax		/* no decoding while BAR0 reads ~0 */
	call cfg_write16
	mov $PCI_BAR0, %ecx
	call cfg_read
	mov %eax, saved_bar0
	test $1, %eax			/* bit 0: I/O space BAR */
	jz 1f
	mov $msg_bar_io, %esi
	jmp fail
1:	and $6, %eax			/* type, bits 2:1 */
	jz 3f				/* 00: 32-bit */
	cmp $4, %eax			/* 10: 64-bit */
	je 2f
	mov $msg_bar_type, %esi
	jmp fail
2:	mov $PCI_BAR1, %ecx		/* the high half must be 0 */
	call cfg_read
	test %eax, %eax
	jz 3f
	mov $msg_bar_high, %esi
	jmp fail
3:	mov $PCI_BAR0, %ecx
	mov $0xffffffff, %eax
	call cfg_write
	call cfg_read			/* size mask */
	mov %eax, %edi
	mov saved_bar0, %eax
	call cfg_write			/* put the address back */
	and $~0xf, %edi
	not %edi
	inc %edi			/* size = ~(mask & ~0xf) + 1 */
	mov %edi, bar0_size
	mov saved_bar0, %eax
	and $~0xf, %eax
	mov %eax, bar0_addr
	movzwl saved_cmd, %eax		/* decode memory, allow DMA/MSI */
	or $(CMD_MEMORY | CMD_MASTER), %eax
	mov $PCI_COMMAND, %ecx
	call cfg_write16

	mov $msg_bar_addr, %esi
	call puts32
	mov bar0_addr, %eax
	mov $8, %ecx
	call puthex32
	mov $msg_size, %esi
	call puts32
	mov bar0_size, %eax
	mov $8, %ecx
	call puthex32
	call newline
	cmpl $0, bar0_addr		/* unassigned: do not scribble on RAM at 0 */
	jne 1f
	mov $msg_bar_zero, %esi
	jmp fail
1:	cmpl $BAR_MIN_SIZE, bar0_size	/* (a size of 0 = 4 GiB, big enough) */
	jae find_msix
	cmpl $0, bar0_size
	je find_msix
	mov $msg_bar_small, %esi
	jmp fail

	/* ---- 4. walk the capability list to MSI-X ---- */
find_msix:
	mov $PCI_COMMAND, %ecx
	call cfg_read
	test $STATUS_CAP_LIST, %eax
	jz no_msix
	mov $PCI_CAP_PTR, %ecx
	call cfg_read
	mov $48, %edi			/* at most 48 capabilities: no loops */
1:	and $0xfc, %eax
	jz no_msix
	mov %eax, %ecx
	call cfg_read			/* id (7:0), next (15:8) */
	cmp $CAP_ID_MSIX, %al
	je 2f
	shr $8, %eax
	dec %edi
	jnz 1b
no_msix:
	mov $msg_no_msix, %esi
	jmp fail

2:	mov %ecx, msix_cap
	shr $16, %eax			/* message control */
	and $0x7ff, %eax
	inc %eax
	mov %eax, msix_vectors
	add $4, %ecx
	call cfg_read
	mov %eax, msix_table		/* offset | BIR */
	add $4, %ecx
	call cfg_read
	mov %eax, msix_pba

	mov $msg_msix_vec, %esi
	call puts32
	mov msix_vectors, %eax
	call putdec32
	mov $msg_table, %esi
	call puts32
	mov msix_table, %eax
	call put_bir_off
	mov $msg_pba, %esi
	call puts32
	mov msix_pba, %eax
	call put_bir_off
	call newline
	testl $7, msix_table
	jz ram_test
	mov $msg_table_bir, %esi
	jmp fail

	/* ---- 5. BAR0 RAM: write both windows, then read both back ---- */
ram_test:
	mov $0x1000, %ecx
	call ram_fill
	mov $0x8000, %ecx
	call ram_fill
	mov $0x1000, %ecx
	call ram_check
	jne ram_bad
	mov $0x8000, %ecx
	call ram_check
	jne ram_bad
	mov $msg_rw_ok, %esi
	call puts32
	jmp irq_setup
ram_bad:
	mov %ecx, %edi			/* the BAR offset that differed */
	mov $msg_rw_bad, %esi
	call puts32
	mov %edi, %eax
	mov $8, %ecx
	call puthex32
	call newline
	jmp leave32

	/* ---- 6. IDT, PIC, LAPIC, MSI-X entry 0 ---- */
irq_setup:
	xor %eax, %eax
	mov %cs, %ax			/* whatever code selector PVH gave us */
	shl $16, %eax
	mov %eax, %ebp
	xor %edi, %edi			/* vector */
1:	mov $isr_other, %edx
	cmp $MSI_VECTOR, %edi
	jne 2f
	mov $isr_msix, %edx
2:	mov %edx, %eax
	and $0xffff, %eax
	or %ebp, %eax			/* selector (31:16) | offset (15:0) */
	mov %eax, idt(,%edi,8)
	and $0xffff0000, %edx
	or $0x8e00, %edx		/* present, DPL 0, 32-bit interrupt gate */
	mov %edx, idt+4(,%edi,8)
	inc %edi
	cmp $256, %edi
	jb 1b
	lidt idtr

	mov $0xff, %al			/* mask both 8259s */
	outb %al, $0x21
	outb %al, $0xa1
	movl $0x1ff, LAPIC_SVR		/* LAPIC on, spurious vector 0xff */

	mov bar0_addr, %edi
	add msix_table, %edi		/* BIR is 0: the table is in BAR0 */
	mov %edi, table0
	mov LAPIC_ID, %eax
	shr $24, %eax			/* our APIC id */
	shl $12, %eax
	or $LAPIC_BASE, %eax		/* 0xfee00000 | dest id << 12 */
	mov %eax, MSIX_ADDR_LO(%edi)
	movl $0, MSIX_ADDR_HI(%edi)
	movl $MSI_VECTOR, MSIX_DATA(%edi) /* fixed, edge, vector 0x40 */
	movl $0, MSIX_VCTRL(%edi)	/* unmasked */
	mov pt_dev, %ebx
	mov msix_cap, %ecx
	call cfg_read
	shr $16, %eax
	or $MSIX_ENABLE, %eax
	and $~MSIX_FUNC_MASK, %eax
	add $2, %ecx			/* message control */
	call cfg_write16

	/* ---- 7. 100 doorbell rounds, one interrupt each ---- */
	movl $1, round
doorbell:
	mov bar0_addr, %esi
	movl $0, BAR_RESPONSE(%esi)
	mov round, %eax
	mov %eax, BAR_DOORBELL(%esi)
	mov $irq_count, %edi
	mov round, %ebp
	mov $TIMEOUT_MS, %ecx
	call wait_ge			/* sti ... cli */
	test %eax, %eax
	jz 1f
	mov $msg_timeout_r, %esi
	jmp fail_round
1:	mov bar0_addr, %esi
	mov BAR_RESPONSE(%esi), %eax
	mov round, %edx
	inc %edx
	cmp %edx, %eax
	je 2f
	mov $msg_bad_resp, %esi
	jmp fail_round
2:	incl round
	cmpl $ROUNDS, round
	jbe doorbell
	mov $msg_rounds_ok, %esi
	call puts32

	/* ---- 8. a masked vector must hold its interrupt until unmasked ---- */
	mov table0, %edi
	movl $1, MSIX_VCTRL(%edi)	/* mask entry 0 */
	mov irq_count, %eax		/* ROUNDS, unless one came twice */
	mov %eax, mask_count
	mov bar0_addr, %esi
	movl $0, BAR_RESPONSE(%esi)
	movl $(ROUNDS + 1), BAR_DOORBELL(%esi)
	lea BAR_RESPONSE(%esi), %edi
	mov $(ROUNDS + 2), %ebp
	mov $TIMEOUT_MS, %ecx
	call wait_ge
	test %eax, %eax
	jz 1f
	mov $msg_timeout_m, %esi
	jmp fail
1:	sti				/* give a wrongly sent interrupt time to land */
	mov $QUIET_MS, %ecx
	call delay_ms
	cli
	mov mask_count, %eax
	cmp irq_count, %eax
	je 2f
	mov $msg_while_masked, %esi
	jmp fail
2:	mov msix_pba, %eax		/* the held interrupt shows in the PBA */
	and $~7, %eax
	add bar0_addr, %eax
	mov %eax, pba0
	testl $1, (%eax)
	jnz 4f
	mov $msg_pba_clear, %esi
	jmp fail
4:	mov table0, %edi
	movl $0, MSIX_VCTRL(%edi)	/* unmask: the pending message goes out */
	mov $irq_count, %edi
	mov mask_count, %ebp
	inc %ebp
	mov $TIMEOUT_MS, %ecx
	call wait_ge
	mov $msg_held, %esi
	test %eax, %eax
	jz 3f
	mov $msg_lost, %esi
3:	call puts32

	/* ---- 8b. delivered is no longer pending: masked again, the PBA bit is clear
	 * and the next unmask delivers nothing ---- */
	mov table0, %edi
	movl $1, MSIX_VCTRL(%edi)
	mov pba0, %eax
	testl $1, (%eax)
	jz 5f
	mov $msg_pba_stale, %esi
	jmp fail
5:	mov irq_count, %eax
	mov %eax, mask_count
	movl $0, MSIX_VCTRL(%edi)
	sti
	mov $QUIET_MS, %ecx
	call delay_ms
	cli
	mov mask_count, %eax
	cmp irq_count, %eax
	je 6f
	mov $msg_redelivered, %esi
	jmp fail
6:	mov $msg_pba_ok, %esi
	call puts32

	/* ---- 9. strays (after a last 10 ms for late ones to land), done ---- */
	sti
	mov $10, %ecx
	call delay_ms
	cli
	mov stray_count, %eax
	test %eax, %eax
	jz 1f
	push %eax
	mov $msg_pci, %esi
	call puts32
	pop %eax
	call putdec32
	mov $msg_strays, %esi
	call puts32
1:	mov $msg_done, %esi
	call puts32
	jmp leave32

/* fail: print the line at %esi and leave. */
fail:
	call puts32
	jmp leave32

/* fail_round: print the text at %esi, the round number and a newline, leave. */
fail_round:
	call puts32
	mov round, %eax
	call putdec32
	call newline
	jmp leave32

/* ------------------------------------------------------------------ */
/* Interrupt handlers (32-bit interrupt gates: IF is off inside).       */
/* ------------------------------------------------------------------ */

/*
 * IRET32: return from an interrupt without `iret`.  KVM's instruction
 * emulator implements iret in real mode only ("emulation failure" in
 * protected mode, seen under QEMU on the software KVM of the test host),
 * so the handlers do it by hand: same privilege and code segment, so the
 * frame is just EIP, CS, EFLAGS.  Rewrite it to EFLAGS, EIP, (unused),
 * then popf (the interrupted flags, IF included) and `ret $4` (back to
 * EIP, dropping the unused slot).  An interrupt between popf and ret nests
 * harmlessly: the return address is still on the stack.
 */
.macro IRET32
	push %eax
	mov 4(%esp), %eax		/* EIP */
	mov %eax, 8(%esp)		/* over CS */
	mov 12(%esp), %eax		/* EFLAGS */
	mov %eax, 4(%esp)		/* over EIP */
	pop %eax
	popf
	ret $4
.endm

isr_msix:
	incl irq_count
	movl $0, LAPIC_EOI
	IRET32

/* Every other vector.  An exception with an error code would unbalance
 * the frame, but none is expected: the count is what matters. */
isr_other:
	incl stray_count
	movl $0, LAPIC_EOI
	IRET32

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */

/* cfg_addr: %eax = mechanism #1 address of register %ecx of 00:%ebx.0. */
cfg_addr:
	mov %ebx, %eax
	shl $11, %eax
	push %ecx
	and $0xfc, %ecx
	or %ecx, %eax
	pop %ecx
	or $0x80000000, %eax		/* enable */
	ret

/* cfg_read: %eax = config dword at register %ecx of 00:%ebx.0.
 * Clobbers %edx. */
cfg_read:
	call cfg_addr
	mov $PCI_ADDR, %dx
	outl %eax, %dx
	mov $PCI_DATA, %dx
	inl %dx, %eax
	ret

/* cfg_write: config dword at register %ecx of 00:%ebx.0 = %eax.
 * Clobbers %edx. */
cfg_write:
	push %eax
	call cfg_addr
	mov $PCI_ADDR, %dx
	outl %eax, %dx
	pop %eax
	mov $PCI_DATA, %dx
	outl %eax, %dx
	ret

/* cfg_write16: the 16-bit config register at %ecx (even) of 00:%ebx.0
 * = %ax, written through port 0xcfc + (%ecx & 2).  Clobbers %edx. */
cfg_write16:
	push %eax
	call cfg_addr
	mov $PCI_ADDR, %dx
	outl %eax, %dx
	pop %eax
	mov %ecx, %edx
	and $2, %edx
	add $PCI_DATA, %edx
	outw %ax, %dx
	ret

/* ram_pattern: %eax = the test pattern for the dword at BAR offset %ecx:
 * i * 0x01010101 ^ 0xa5a5a5a5 with i = offset / 4. */
ram_pattern:
	mov %ecx, %eax
	shr $2, %eax
	imul $0x01010101, %eax, %eax
	xor $0xa5a5a5a5, %eax
	ret

/* ram_fill: write the pattern to the 4 KiB at BAR0 offset %ecx.
 * Clobbers %eax, %ecx, %edx. */
ram_fill:
	lea 0x1000(%ecx), %edx		/* end */
1:	call ram_pattern
	push %edx
	mov bar0_addr, %edx
	mov %eax, (%edx,%ecx)
	pop %edx
	add $4, %ecx
	cmp %edx, %ecx
	jb 1b
	ret

/* ram_check: compare the 4 KiB at BAR0 offset %ecx with the pattern.
 * ZF set if all match; else ZF clear and %ecx = the first bad offset.
 * Clobbers %eax, %ecx, %edx. */
ram_check:
	lea 0x1000(%ecx), %edx
1:	call ram_pattern
	push %edx
	mov bar0_addr, %edx
	cmp (%edx,%ecx), %eax
	pop %edx
	jne 2f
	add $4, %ecx
	cmp %edx, %ecx
	jb 1b
	xor %eax, %eax			/* sets ZF */
2:	ret

/*
 * wait_ge: with interrupts enabled, spin (no hlt: a lost interrupt must
 * not hang the guest) until the u32 at %edi is >= %ebp (unsigned) or
 * %ecx milliseconds of TSC time pass, then cli.  %eax = 0 if reached,
 * 1 on timeout.  Clobbers %eax, %ebx, %ecx, %edx.
 */
wait_ge:
	sti
1:	rdtsc
	mov %eax, %ebx			/* start of this millisecond */
2:	cmp %ebp, (%edi)
	jae 3f
	rdtsc
	sub %ebx, %eax
	cmp tsc_per_ms, %eax
	jb 2b
	dec %ecx
	jnz 1b
	cli
	cmp %ebp, (%edi)		/* a last look */
	jae 4f
	mov $1, %eax
	ret
3:	cli
4:	xor %eax, %eax
	ret

/* puthex32: the low %ecx (1..8) hex digits of %eax, lowercase, zero
 * padded.  Clobbers %eax, %ecx, %edx. */
puthex32:
	push %ebx
	mov %eax, %ebx
	mov %ecx, %eax			/* digits */
	neg %ecx
	add $8, %ecx
	shl $2, %ecx
	rol %cl, %ebx			/* drop the (8 - digits) top nibbles */
	mov %eax, %ecx
	mov $COM1, %dx
1:	rol $4, %ebx			/* next nibble to the bottom */
	mov %ebx, %eax
	and $0xf, %eax
	cmp $10, %eax
	jb 2f
	add $('a' - '0' - 10), %eax
2:	add $'0', %eax
	outb %al, %dx
	dec %ecx
	jnz 1b
	pop %ebx
	ret

/* putc: the character in %al.  Clobbers %edx. */
putc:
	mov $COM1, %dx
	outb %al, %dx
	ret

/* newline: "\n".  Clobbers %eax, %edx. */
newline:
	mov $'\n', %al
	jmp putc

/* put_bdf: "00:DD.0" for device %eax.  Clobbers %eax, %ecx, %edx, %esi. */
put_bdf:
	push %eax
	mov $msg_bus0, %esi
	call puts32
	pop %eax
	mov $2, %ecx
	call puthex32
	mov $msg_fn0, %esi
	jmp puts32

/* put_dev: "00:DD.0 VVVV:DDDD" for device %ebx with id dword %edi.
 * Clobbers %eax, %ecx, %edx, %esi. */
put_dev:
	mov %ebx, %eax
	call put_bdf
	mov $' ', %al
	call putc
	mov %edi, %eax
	jmp put_id

/* put_id: "VVVV:DDDD" for the id dword %eax.  Clobbers %eax, %ecx, %edx. */
put_id:
	push %eax
	mov $4, %ecx
	call puthex32			/* vendor: the low 16 bits */
	mov $':', %al
	call putc
	pop %eax
	shr $16, %eax
	mov $4, %ecx
	jmp puthex32

/* put_bir_off: "barB+XXXXXXXX" for an MSI-X table/PBA dword (offset | BIR).
 * Clobbers %eax, %ecx, %edx, %esi. */
put_bir_off:
	push %eax
	mov $msg_bar, %esi
	call puts32
	mov (%esp), %eax
	and $7, %eax
	add $'0', %al
	call putc
	mov $'+', %al
	call putc
	pop %eax
	and $~7, %eax
	mov $8, %ecx
	jmp puthex32

	.section .rodata
msg_pci:	.asciz "pci: "
msg_bus0:	.asciz "00:"
msg_fn0:	.asciz ".0"
msg_class:	.asciz " class "
msg_no_pt:	.asciz "pci: no passthrough device\n"
msg_ecam:	.asciz "ecam: "
msg_ecam_bad:	.asciz "ecam: mismatch\n"
msg_bar_io:	.asciz "bar0: not a memory bar\n"
msg_bar_type:	.asciz "bar0: bad memory bar type\n"
msg_bar_high:	.asciz "bar0: above 4G\n"
msg_bar_addr:	.asciz "bar0: addr="
msg_size:	.asciz " size="
msg_bar_zero:	.asciz "bar0: not assigned\n"
msg_bar_small:	.asciz "bar0: too small\n"
msg_no_msix:	.asciz "msix: no capability\n"
msg_msix_vec:	.asciz "msix: vectors="
msg_table:	.asciz " table="
msg_pba:	.asciz " pba="
msg_bar:	.asciz "bar"
msg_table_bir:	.asciz "msix: table not in bar0\n"
msg_rw_ok:	.asciz "bar0: rw ok\n"
msg_rw_bad:	.asciz "bar0: rw mismatch at "
msg_timeout_r:	.asciz "msix: timeout in round "
msg_bad_resp:	.asciz "msix: bad response in round "
msg_rounds_ok:	.asciz "msix: 100 interrupts ok\n"
msg_timeout_m:	.asciz "msix: timeout in mask test\n"
msg_while_masked: .asciz "msix: interrupt while masked\n"
msg_held:	.asciz "msix: masked vector held, delivered on unmask\n"
msg_lost:	.asciz "msix: pending interrupt lost\n"
msg_pba_clear:	.asciz "msix: PBA bit clear while an interrupt is held\n"
msg_pba_stale:	.asciz "msix: PBA bit still set after delivery\n"
msg_redelivered: .asciz "msix: held interrupt delivered twice\n"
msg_pba_ok:	.asciz "msix: PBA pending while held, clear once delivered\n"
msg_strays:	.asciz " stray interrupts\n"
msg_done:	.asciz "pci: done\n"

	.balign 4
idtr:	.word 256 * 8 - 1		/* limit */
	.long idt			/* base */

	.bss
	.balign 8
idt:		.skip 256 * 8
irq_count:	.skip 4			/* vector 0x40 interrupts seen */
stray_count:	.skip 4			/* any other vector */
pt_dev:		.skip 4			/* the passthrough device's number, -1: none */
pt_id:		.skip 4			/* its id dword through mechanism #1 */
saved_bar0:	.skip 4
bar0_addr:	.skip 4
bar0_size:	.skip 4
msix_cap:	.skip 4			/* config offset of the MSI-X capability */
msix_vectors:	.skip 4
msix_table:	.skip 4			/* table offset | BIR */
msix_pba:	.skip 4			/* PBA offset | BIR */
table0:		.skip 4			/* address of MSI-X table entry 0 */
round:		.skip 4
mask_count:	.skip 4			/* irq_count when entry 0 was masked */
pba0:		.skip 4			/* address of the PBA's first dword */
saved_cmd:	.skip 2
