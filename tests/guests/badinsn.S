/*
 * badinsn.S: makes KVM fail to emulate an instruction.
 *
 * Prints "badinsn: start", then executes popcnt (f3 0f b8 c0), which the
 * software KVM of the test host does not emulate (KVM_EXIT_INTERNAL_ERROR).
 * On hardware KVM popcnt simply runs: the guest then prints
 * "badinsn: popcnt ran" and jumps to physical address 0xd0000000, a hole
 * without RAM; fetching instructions from there makes KVM fail emulation
 * as well.
 */
#include "common.S"

	PVH_NOTE _start

	.text
	.code32
	.globl _start
_start:				/* PVH entry */
	cli
	cld
	mov $stack_top, %esp
	mov $msg_start, %esi
	call puts32

	xor %eax, %eax
	.byte 0xf3, 0x0f, 0xb8, 0xc0	/* popcnt %eax, %eax */

	mov $msg_ran, %esi
	call puts32
	mov $0xd0000000, %eax
	jmp *%eax		/* instruction fetch from unbacked memory */

	.section .rodata
msg_start:
	.asciz "badinsn: start\n"
msg_ran:
	.asciz "badinsn: popcnt ran\n"
