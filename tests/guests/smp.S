/*
 * smp.S: starts the secondary CPUs the way Linux does (INIT, then two
 * STARTUP IPIs through the local APIC's ICR, into a real-mode trampoline
 * below 1 MiB) and reports which ones came up.  PVH entry.
 *
 * BSP:
 *   prints "smp: bsp up"; reads its APIC id from the LAPIC (0xfee00020) and
 *   the other CPUs' APIC ids from the MP table (enabled processor entries);
 *   copies the real-mode trampoline to TRAMP_BASE (0x10000, SIPI vector
 *   0x10); for each AP: INIT assert, 10 ms, INIT de-assert, then two SIPIs
 *   1 ms apart (polling the ICR delivery-status bit before each write);
 *   then waits up to TIMEOUT_MS (TSC) for every AP to check in and prints
 *   "smp: <N> cpus up", or "smp: timeout, <k> of <N> up" (N and k count
 *   the BSP), and leaves.
 * AP (real mode, CS = 0x1000, IP = 0):
 *   reads its initial APIC id from CPUID leaf 1 EBX[31:24]; takes a
 *   spinlock (lock xchg) that also serialises the BSP's last line; on its
 *   first check-in prints "smp: ap up apic=<id>" and counts itself; drops
 *   the lock and halts (cli; hlt loop).
 *
 * Only simple integer instructions (see common.S): no string instructions,
 * no cmpxchg; the AP uses no stack.
 */
#include "common.S"
#include "util32.S"

#define LAPIC_BASE		0xfee00000
#define LAPIC_ID		(LAPIC_BASE + 0x020)
#define LAPIC_SVR		(LAPIC_BASE + 0x0f0)
#define LAPIC_ICR_LO		(LAPIC_BASE + 0x300)
#define LAPIC_ICR_HI		(LAPIC_BASE + 0x310)
#define ICR_BUSY		(1 << 12)	/* delivery status: send pending */
#define ICR_INIT_ASSERT		0xc500		/* level, assert, INIT */
#define ICR_INIT_DEASSERT	0x8500		/* level, de-assert, INIT */
#define ICR_STARTUP		0x0600		/* STARTUP, vector in bits 7:0 */

#define TRAMP_BASE		0x10000		/* 4 KiB aligned, below 1 MiB */
#define SIPI_VECTOR		(TRAMP_BASE >> 12)
#define TIMEOUT_MS		2000

/* Where a trampoline variable lives once the trampoline is copied. */
#define TRAMP_ADDR(sym)		(TRAMP_BASE + (sym) - tramp_start)
/* Its offset from CS (= DS) in the AP's real mode. */
#define TRAMP_OFF(sym)		((sym) - tramp_start)

	PVH_NOTE _start

	.text
	.code32
	.globl _start
_start:				/* PVH entry: 32-bit protected mode, paging off */
	cli
	cld
	mov $stack_top, %esp
	call tsc_init
	mov $msg_bsp, %esi
	call puts32

	mov LAPIC_ID, %eax
	shr $24, %eax
	mov %eax, bsp_id
	call mp_scan

	/* Copy the trampoline below 1 MiB, byte by byte. */
	mov $tramp_start, %esi
	mov $TRAMP_BASE, %edi
	mov $(tramp_end - tramp_start), %ecx
1:	movb (%esi), %al
	movb %al, (%edi)
	inc %esi
	inc %edi
	dec %ecx
	jnz 1b

	/* Software-enable our LAPIC (spurious vector 0xff), as Linux does. */
	movl $0x1ff, LAPIC_SVR

	/* INIT, INIT de-assert, SIPI, SIPI to every AP in turn. */
	xor %edi, %edi
wake_next:
	cmp ap_count, %edi
	jae wait_aps
	movzbl ap_ids(%edi), %eax
	shl $24, %eax
	mov %eax, icr_dest
	mov $ICR_INIT_ASSERT, %eax
	call send_ipi
	mov $10, %ecx
	call delay_ms
	mov $ICR_INIT_DEASSERT, %eax
	call send_ipi
	mov $(ICR_STARTUP | SIPI_VECTOR), %eax
	call send_ipi
	mov $1, %ecx
	call delay_ms
	mov $(ICR_STARTUP | SIPI_VECTOR), %eax
	call send_ipi
	mov $1, %ecx
	call delay_ms
	inc %edi
	jmp wake_next

	/* Wait (bounded) for every AP to check in. */
wait_aps:
	mov $TIMEOUT_MS, %edi
1:	mov TRAMP_ADDR(tr_count), %eax
	cmp ap_count, %eax
	jae all_up
	mov $1, %ecx
	call delay_ms
	dec %edi
	jnz 1b

	call lock32
	mov $msg_timeout, %esi
	call puts32
	mov TRAMP_ADDR(tr_count), %eax
	inc %eax			/* the BSP is up too */
	call putdec32
	mov $msg_of, %esi
	call puts32
	mov ap_count, %eax
	inc %eax
	call putdec32
	mov $msg_up, %esi
	call puts32
	jmp leave32

all_up:
	call lock32
	mov $msg_smp, %esi
	call puts32
	mov TRAMP_ADDR(tr_count), %eax
	inc %eax
	call putdec32
	mov $msg_cpus_up, %esi
	call puts32
	jmp leave32

/* lock32: take the trampoline's print lock (kept: the BSP leaves next). */
lock32:
1:	mov $1, %al
	lock xchg %al, TRAMP_ADDR(tr_lock)
	test %al, %al
	jnz 1b
	ret

/*
 * send_ipi: %eax = ICR low word, icr_dest = ICR high word.  Waits (bounded,
 * ~100 ms) for the previous IPI to be delivered, writes ICR high then low
 * (the low write sends), and waits again.  Clobbers %eax, %ebx, %ecx, %edx.
 */
send_ipi:
	push %eax
	call icr_wait
	mov icr_dest, %eax
	mov %eax, LAPIC_ICR_HI
	pop %eax
	mov %eax, LAPIC_ICR_LO
icr_wait:
	mov $100, %ecx
1:	testl $ICR_BUSY, LAPIC_ICR_LO
	jz 2f
	push %ecx
	mov $1, %ecx
	call delay_ms
	pop %ecx
	dec %ecx
	jnz 1b
2:	ret

/*
 * mp_scan: find the MP floating pointer ("_MP_") on 16-byte boundaries in
 * 0x9fc00..0xa0000, then 0xf0000..0x100000, and walk its "PCMP" table like
 * bootinfo.S does.  Every enabled processor entry whose APIC id is not
 * bsp_id goes to ap_ids[ap_count++].  No MP table: no APs.
 */
mp_scan:
	movl $0, ap_count
	mov $0x9fc00, %esi
	mov $0xa0000, %edi
	call mp_find32
	jnz 1f
	mov $0xf0000, %esi
	mov $0x100000, %edi
	call mp_find32
	jz mp_none
1:	mov 4(%esi), %ebx		/* physptr of the config table */
	test %ebx, %ebx
	jz mp_none
	cmpl $0x504d4350, (%ebx)	/* "PCMP" */
	jne mp_none
	movzwl 4(%ebx), %edx		/* base table length */
	add %ebx, %edx			/* end of the base table */
	movzwl 0x22(%ebx), %ecx		/* entry count (0: bounded by length) */
	test %ecx, %ecx
	jnz 2f
	mov $0x10000, %ecx
2:	lea 44(%ebx), %esi		/* first entry */
3:	test %ecx, %ecx
	jz 6f
	cmp %edx, %esi
	jae 6f
	movzbl (%esi), %eax		/* entry type */
	test %eax, %eax
	jnz 5f
	testb $1, 3(%esi)		/* enabled processor? */
	jz 4f
	movzbl 1(%esi), %eax		/* its APIC id */
	cmp bsp_id, %eax
	je 4f
	mov ap_count, %ebp
	cmp $255, %ebp
	jae 4f
	movb %al, ap_ids(%ebp)
	incl ap_count
4:	add $20, %esi			/* processor entries are 20 bytes */
	dec %ecx
	jmp 3b
5:	add $8, %esi			/* all others 8 */
	dec %ecx
	jmp 3b
6:	ret

mp_none:
	mov $msg_no_mp, %esi
	jmp puts32

/* mp_find32: scan [%esi, %edi) in 16-byte steps for "_MP_".
 * Returns ZF clear and %esi = address if found, ZF set if not. */
mp_find32:
1:	cmp %edi, %esi
	jae 3f
	cmpl $0x5f504d5f, (%esi)	/* "_MP_" */
	je 2f
	add $16, %esi
	jmp 1b
2:	or $1, %eax			/* clears ZF */
	ret
3:	xor %eax, %eax			/* sets ZF */
	ret

/* ------------------------------------------------------------------ */
/* The AP trampoline: copied to TRAMP_BASE, entered in real mode at     */
/* CS:IP = (SIPI_VECTOR << 8):0.  Position independent; data via DS=CS. */
/* ------------------------------------------------------------------ */
	.balign 16
	.code16
tramp_start:
	cli
	mov %cs, %ax
	mov %ax, %ds
	mov $1, %eax
	cpuid
	shr $24, %ebx			/* initial APIC id */
	and $0xff, %bx

	/* Take the print lock. */
1:	mov $1, %al
	lock xchg %al, TRAMP_OFF(tr_lock)
	test %al, %al
	jnz 1b

	/* Only the first arrival of an APIC id prints and counts. */
	mov $1, %al
	lock xchg %al, TRAMP_OFF(tr_seen)(%bx)
	test %al, %al
	jnz 5f

	mov $COM1, %dx
	mov $TRAMP_OFF(tr_msg), %si
2:	movb (%si), %al
	test %al, %al
	jz 3f
	outb %al, %dx
	inc %si
	jmp 2b
3:	/* %bx in decimal, no leading zeros */
	mov %bx, %ax
	mov $100, %cl
	div %cl				/* %al = hundreds, %ah = the rest */
	mov %ah, %ch
	cmp $100, %bx
	jb 4f
	add $'0', %al
	outb %al, %dx
4:	movzbw %ch, %ax
	mov $10, %cl
	div %cl				/* %al = tens, %ah = ones */
	cmp $10, %bx
	jb 41f
	add $'0', %al
	outb %al, %dx
41:	mov %ah, %al
	add $'0', %al
	outb %al, %dx
	mov $'\n', %al
	outb %al, %dx
	lock incl TRAMP_OFF(tr_count)

5:	movb $0, TRAMP_OFF(tr_lock)	/* drop the lock */
6:	cli
	hlt
	jmp 6b

tr_msg:	.asciz "smp: ap up apic="
	.balign 4
tr_count:	.long 0			/* APs checked in */
tr_lock:	.byte 0			/* print lock: 1 = held */
tr_seen:	.fill 256, 1, 0		/* per APIC id: checked in */
tramp_end:
	.code32

	.section .rodata
msg_bsp:	.asciz "smp: bsp up\n"
msg_smp:	.asciz "smp: "
msg_cpus_up:	.asciz " cpus up\n"
msg_timeout:	.asciz "smp: timeout, "
msg_of:		.asciz " of "
msg_up:		.asciz " up\n"
msg_no_mp:	.asciz "smp: no mp table\n"

	.bss
	.balign 4
bsp_id:		.skip 4
ap_count:	.skip 4
icr_dest:	.skip 4
ap_ids:		.skip 256
