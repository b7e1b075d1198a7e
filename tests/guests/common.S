/*
 * common.S: shared pieces of the hpcvm test guests.
 *
 * This file is NOT a guest of its own: every guest source does
 * `#include "common.S"` at its top.  It provides
 *   - PVH_NOTE entry   : the Xen ELF note announcing the PVH 32-bit entry,
 *   - LEAVE            : the common way a guest finishes,
 *   - puts32 / leave32 : 32-bit helpers (serial output, leaving),
 *   - a 16 KiB stack in .bss (stack_top).
 *
 * Only simple integer instructions are used (no string instructions, no
 * SSE, no popcnt, no int3): the software KVM on the test host emulates
 * guest ring-0 code instruction by instruction and lacks some instructions.
 */

#define COM1 0x3f8

/* Tell the linker we do not need an executable stack. */
	.section .note.GNU-stack, "", @progbits

/*
 * PVH_NOTE entry: ELF note name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY),
 * descriptor = the 32-bit physical entry address.
 *
 * The descriptor is a .quad, like Linux does it:
 *  - linux-loader 0.14 accepts namesz == 4 ("Xen\0"), type 18 and any
 *    descsz >= 4, reading the first 4 bytes (little endian);
 *  - QEMU (x86-common.c read_pvh_start_addr) reads, for ELF64 images, a
 *    size_t (8 bytes on older versions) at the descriptor, which is placed
 *    at ALIGN_UP(namesz, p_align of the PT_NOTE); the note section is
 *    4-byte aligned, so the descriptor is right after "Xen\0" for both.
 */
.macro PVH_NOTE entry
	.pushsection .note.Xen, "a", @note
	.balign 4
	.long .Lname_end\@ - .Lname\@	/* n_namesz = 4 */
	.long .Ldesc_end\@ - .Ldesc\@	/* n_descsz = 8 */
	.long 18			/* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
.Lname\@:
	.asciz "Xen"
.Lname_end\@:
	.balign 4
.Ldesc\@:
	.quad \entry
.Ldesc_end\@:
	.balign 4
	.popsection
.endm

/*
 * LEAVE: how every guest that finishes leaves, in this order:
 *   1. outb 0xfe -> port 0x64: i8042 "pulse reset line"; this is how
 *      hpcvm ends a guest;
 *   2. outl 0 -> port 0xf4: QEMU isa-debug-exit (QEMU exits with status 1);
 *   3. cli; hlt forever.
 * The encoding is the same in 32-bit and 64-bit mode.
 */
.macro LEAVE
	mov $0xfe, %al
	outb %al, $0x64
	xor %eax, %eax
	outl %eax, $0xf4
.Lhalt\@:
	cli
	hlt
	jmp .Lhalt\@
.endm

	.text
	.code32

/* puts32: write the NUL-terminated string at %esi to COM1.
 * Clobbers %eax, %edx, %esi. */
puts32:
	mov $COM1, %dx
1:	movb (%esi), %al
	test %al, %al
	jz 2f
	outb %al, %dx
	inc %esi
	jmp 1b
2:	ret

/* leave32: finish the guest (never returns). */
leave32:
	LEAVE

/* The stack; no guest uses more than a few dozen bytes of it. */
	.bss
	.balign 16
stack:
	.skip 16384
stack_top:

	.text
