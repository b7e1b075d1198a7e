/*
 * shutdown-aware.S: a guest that honours a shutdown request delivered the
 * way a PC delivers Ctrl-Alt-Del: as keyboard scancodes (set 1) through
 * the i8042.  Prints "shutdown-aware: ready", then, with interrupts off,
 * polls the i8042 status port 0x64; whenever bit 0 (output buffer full) is
 * set it reads one byte from the data port 0x60.  When a 0xe0 byte is
 * followed by 0x53 (the make code of Delete, as in the sequence
 * 0x1d 0x38 0xe0 0x53 0xe0 0xd3 0xb8 0x9d = Ctrl, Alt, Delete make, then
 * the breaks) it prints "shutdown-aware: got ctrl-alt-del" and leaves.
 * Modifier state is not tracked: Delete alone is taken as the request.
 * Between polls it spins ~1 ms (TSC) to keep the emulation load low.
 */
#include "common.S"
#include "util32.S"

#define I8042_DATA	0x60
#define I8042_STATUS	0x64
#define I8042_OBF	0x01	/* status: output buffer full */

	PVH_NOTE _start

	.text
	.code32
	.globl _start
_start:				/* PVH entry: 32-bit protected mode, paging off */
	cli
	cld
	mov $stack_top, %esp
	call tsc_init
	mov $msg_ready, %esi
	call puts32
	xor %edi, %edi		/* previous byte read from port 0x60 */
round:
	mov $16, %ebp		/* bytes read at most per round */
poll:
	inb $I8042_STATUS, %al
	test $I8042_OBF, %al
	jz wait
	inb $I8042_DATA, %al
	movzbl %al, %eax
	cmp $0xe0, %edi
	jne 1f
	cmp $0x53, %eax
	je got_it
1:	mov %eax, %edi
	dec %ebp		/* drain what is queued before waiting again, */
	jnz poll		/* but never spin on a status port stuck at 0xff */
wait:
	mov $1, %ecx
	call delay_ms
	jmp round

got_it:
	mov $msg_got, %esi
	call puts32
	jmp leave32

	.section .rodata
msg_ready:	.asciz "shutdown-aware: ready\n"
msg_got:	.asciz "shutdown-aware: got ctrl-alt-del\n"
