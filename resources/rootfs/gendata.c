/*
 * gendata SIZE_BYTES SEED > disk.img
 * Deterministic pseudo-random bytes (xorshift64*), for the md5 tests.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	unsigned long long size, i;
	uint64_t x;

	if (argc != 3)
		return 2;
	size = strtoull(argv[1], NULL, 0);
	x = strtoull(argv[2], NULL, 0) | 1;
	for (i = 0; i < size; i += 8) {
		uint64_t v;

		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		v = x * 0x2545F4914F6CDD1DULL;
		if (fwrite(&v, 1, size - i < 8 ? size - i : 8, stdout) == 0)
			return 1;
	}
	return fflush(stdout) ? 1 : 0;
}
