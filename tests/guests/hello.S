/*
 * hello.S: the smallest useful guest (PVH entry).
 * Prints "hello from guest" and leaves.  Used by the start-up benchmark.
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
	mov $msg, %esi
	call puts32
	jmp leave32

	.section .rodata
msg:	.asciz "hello from guest\n"
