/*
 * triplefault.S: prints "triplefault: start", then provokes a triple fault:
 * the IDT is loaded with limit 0, so the #DE from dividing by zero cannot
 * be delivered (-> #GP, which cannot be delivered either -> #DF, which
 * cannot be delivered -> triple fault = shutdown).
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

	lidt zero_idt		/* IDT base 0, limit 0 */
	xor %ecx, %ecx
	xor %edx, %edx
	div %ecx		/* #DE -> ... -> triple fault */

	/* Fallbacks, only reached if the division somehow did not fault. */
	ud2
	int3

	/* Still alive: say so and leave, so a test fails instead of hanging. */
	mov $msg_alive, %esi
	call puts32
	jmp leave32

	.section .rodata
	.balign 8
zero_idt:
	.word 0			/* limit */
	.long 0			/* base */
msg_start:
	.asciz "triplefault: start\n"
msg_alive:
	.asciz "triplefault: survived\n"
