/*
 * spin.S: prints "spin: start" then loops forever with interrupts off.
 * Used to test timeouts / killing a running guest.  Never leaves.
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
	mov $msg, %esi
	call puts32
	cli
1:	jmp 1b

	.section .rodata
msg:	.asciz "spin: start\n"
