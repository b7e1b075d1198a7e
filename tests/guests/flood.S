/*
 * flood.S: prints "flood\n" to COM1 as fast as the UART takes it, forever.
 * Used to show that a stdout nobody reads never blocks a vCPU: pause,
 * destroy and signals still work.
 */
#include "common.S"

	PVH_NOTE _start

	.text
	.code32
	.globl _start
_start:				/* PVH entry: 32-bit protected mode, paging off */
	cli
	cld
	mov $stack_top, %esp
1:	mov $msg, %esi
	call puts32
	jmp 1b

	.section .rodata
msg:	.asciz "flood flood flood flood flood flood flood flood\n"
