/* framer_check: chatclient's framer alone, driven by a script on stdin, for differential tests
 * against the server's Framer (tests/test_chatclient.py). Not part of the client.
 *
 * Script records: 'B' int64 now_ms, uint32 n, n bytes (a burst); 'Q' int64 now_ms (a quiet check);
 * 'S' (we spoke); 'E' (the stream ended); 'R' (start again: a new connection). Output: each
 * message as uint32 n and n bytes; 'R' writes uint32 0xFFFFFFFF.
 */
#define _GNU_SOURCE
#include <stdint.h>

#define main chatclient_main
#include "chatclient.c"
#undef main

static int get(void *p, size_t n)
{
	return fread(p, 1, n, stdin) == n;
}

static void put_all(void)
{
	const unsigned char *m;
	size_t n;
	while (frame_next(&fr, &m, &n)) {
		uint32_t len = (uint32_t)n;
		fwrite(&len, sizeof len, 1, stdout);
		fwrite(m, 1, n, stdout);
	}
}

int main(void)
{
	static unsigned char data[1 << 20];
	int op;
	while ((op = getchar()) != EOF) {
		long long now = 0;
		uint32_t n = 0;
		if ((op == 'B' || op == 'Q') && !get(&now, sizeof now))
			return 1;
		if (op == 'B') {
			if (!get(&n, sizeof n) || n > sizeof data || !get(data, n))
				return 1;
			frame_burst(&fr, data, n, now);
		} else if (op == 'Q') {
			frame_quiet(&fr, now, 0);
		} else if (op == 'S') {
			fr.padding = 0;
		} else if (op == 'E') {
			frame_quiet(&fr, 0, 1);
		} else if (op == 'R') {
			uint32_t mark = 0xFFFFFFFF;
			memset(&fr, 0, sizeof fr);
			fwrite(&mark, sizeof mark, 1, stdout);
		}
		put_all();
	}
	return 0;
}
