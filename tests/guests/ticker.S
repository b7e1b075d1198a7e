/*
 * ticker.S: prints "tick <n>" (n = 0, 1, 2, ... in decimal) forever, one
 * line roughly every 50 ms of TSC time (see tsc_init in util32.S: at most
 * ~50 lines/s on any host, whatever CPUID says).  Interrupts stay off.
 * Never leaves.  Used by the pause/resume tests: while the VM is paused
 * the count stops, and it carries on from where it was after a resume.
 */
#include "common.S"
#include "util32.S"

#define TICK_MS	50

	PVH_NOTE _start

	.text
	.code32
	.globl _start
_start:				/* PVH entry: 32-bit protected mode, paging off */
	cli
	cld
	mov $stack_top, %esp
	call tsc_init
	xor %edi, %edi		/* n */
1:	mov $msg_tick, %esi
	call puts32
	mov %edi, %eax
	call putdec32
	mov $'\n', %al
	mov $COM1, %dx
	outb %al, %dx
	inc %edi
	mov $TICK_MS, %ecx
	call delay_ms
	jmp 1b

	.section .rodata
msg_tick:	.asciz "tick "
