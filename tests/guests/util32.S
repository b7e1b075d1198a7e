/*
 * util32.S: 32-bit helpers shared by the guests that need time or numbers
 * (smp, shutdown-aware, ticker).  Not a guest of its own: `#include` it
 * after common.S.  Only simple integer instructions (see common.S).
 *
 *   putdec32   print %eax in decimal to COM1
 *   tsc_init   work out TSC ticks per millisecond into tsc_per_ms
 *   delay_ms   spin for %ecx milliseconds, measured with rdtsc
 */

#define TSC_DEFAULT_PER_MS	2500000		/* 2.5 GHz when CPUID says nothing */
#define TSC_MIN_PER_MS		1000000		/* below 1 GHz: do not trust it */

	.text
	.code32

/* putdec32: %eax in decimal.  Clobbers %eax, %ecx, %edx, %esi. */
putdec32:
	mov $decbuf32_end, %esi
	movb $0, (%esi)
	mov $10, %ecx
1:	xor %edx, %edx
	div %ecx
	add $'0', %dl
	dec %esi
	movb %dl, (%esi)
	test %eax, %eax
	jnz 1b
	jmp puts32

/*
 * tsc_init: tsc_per_ms = TSC frequency / 1000, from CPUID leaf 0x15
 * (crystal Hz * numerator / denominator) if it is complete, else leaf 0x16
 * (base MHz), else 2.5 GHz.  Values under 1 GHz fall back to 2.5 GHz so
 * that a bogus leaf can only make the guest slower, never print faster.
 * Exactness does not matter.  Clobbers %eax, %ebx, %ecx, %edx, %esi.
 */
tsc_init:
	xor %eax, %eax
	xor %ecx, %ecx
	cpuid
	mov %eax, %esi			/* highest basic leaf */
	cmp $0x15, %esi
	jb 3f
	mov $0x15, %eax
	xor %ecx, %ecx
	cpuid				/* eax = denominator, ebx = numerator, ecx = crystal Hz */
	test %eax, %eax
	jz 2f
	test %ebx, %ebx
	jz 2f
	test %ecx, %ecx
	jz 2f
	imul $1000, %eax, %eax		/* denominator * 1000 (per ms) */
	mov %eax, tsc_div
	mov %ecx, %eax
	mul %ebx			/* edx:eax = crystal Hz * numerator = TSC Hz * denominator */
	cmp tsc_div, %edx		/* quotient would not fit in 32 bits */
	jae 2f
	divl tsc_div
	jmp 4f
2:	cmp $0x16, %esi
	jb 3f
	mov $0x16, %eax
	xor %ecx, %ecx
	cpuid				/* eax = base frequency in MHz */
	and $0xffff, %eax
	imul $1000, %eax, %eax
	jmp 4f
3:	mov $TSC_DEFAULT_PER_MS, %eax
4:	cmp $TSC_MIN_PER_MS, %eax
	jae 5f
	mov $TSC_DEFAULT_PER_MS, %eax
5:	mov %eax, tsc_per_ms
	ret

/*
 * delay_ms: spin for %ecx milliseconds (at least 1), one rdtsc window per
 * millisecond; 32-bit differences wrap correctly.  Call tsc_init first.
 * Clobbers %eax, %ebx, %ecx, %edx.
 */
delay_ms:
	test %ecx, %ecx
	jnz 1f
	inc %ecx
1:	rdtsc
	mov %eax, %ebx			/* start of this millisecond */
2:	rdtsc
	sub %ebx, %eax
	cmp tsc_per_ms, %eax
	jb 2b
	dec %ecx
	jnz 1b
	ret

	.bss
	.balign 4
tsc_per_ms:	.skip 4
tsc_div:	.skip 4
decbuf32:	.skip 11
decbuf32_end:	.skip 1

	.text
