/* chatclient: a turn-based chat client for the CS372 chat protocol (see docs/protocol.md).
 *
 * One loop waits on the keyboard and the socket at once, so a server that goes away is noticed
 * while the user is typing. Received text is framed tolerantly (newline or NUL ends a message,
 * NUL padding is dropped, an unterminated burst completes after 150 ms of quiet) and made
 * visible before it reaches the terminal: control and invisible characters become escapes.
 */
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_HANDLE 10     /* characters */
#define MAX_TEXT 500      /* characters */
#define MAX_LINE 8192     /* bytes: a longer received line is cut here */
#define QUIET_MS 150      /* quiet time that completes an unterminated burst */
#define INPUT_MAX 4096    /* bytes of one typed line we accept */

static volatile sig_atomic_t stop_signal;
static char handle[4 * MAX_HANDLE + 1];
static int sock = -1;

static void die(const char *fmt, ...)
{
	va_list ap;
	fputs("chatclient: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void usage(FILE *f, int status)
{
	fputs("usage: chatclient [-t SECONDS] HOST PORT\n"
	      "Chat with a chatlog (CS372 chat) server at HOST:PORT. You speak first; type \\quit\n"
	      "or press Ctrl-D to leave. -t gives up if the server does not answer in time.\n", f);
	exit(status);
}

static void on_signal(int sig)
{
	stop_signal = sig;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Number of UTF-8 code points in s (bytes that are not continuation bytes). */
static size_t utf8_len(const char *s, size_t n)
{
	size_t count = 0;
	for (size_t i = 0; i < n; i++)
		if (((unsigned char)s[i] & 0xC0) != 0x80)
			count++;
	return count;
}

/* Length of a valid UTF-8 sequence starting at s (1-4), or 0 if it is not valid. */
static size_t utf8_seq(const unsigned char *s, size_t n, unsigned long *cp)
{
	size_t len;
	unsigned long c;
	if (s[0] < 0x80) { *cp = s[0]; return 1; }
	if (s[0] >= 0xC2 && s[0] <= 0xDF) { len = 2; c = s[0] & 0x1F; }
	else if (s[0] >= 0xE0 && s[0] <= 0xEF) { len = 3; c = s[0] & 0x0F; }
	else if (s[0] >= 0xF0 && s[0] <= 0xF4) { len = 4; c = s[0] & 0x07; }
	else return 0;
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3F);
	}
	if ((len == 3 && (c < 0x800 || (c >= 0xD800 && c <= 0xDFFF))) ||
	    (len == 4 && (c < 0x10000 || c > 0x10FFFF)))
		return 0;
	*cp = c;
	return len;
}

/* Invisible or reordering characters that are shown as \uNNNN. */
static int is_format_char(unsigned long c)
{
	return c == 0x00AD || c == 0x061C || c == 0x180E || c == 0xFEFF ||
	       (c >= 0x200B && c <= 0x200F) || (c >= 0x2028 && c <= 0x202E) ||
	       (c >= 0x2060 && c <= 0x206F) || (c >= 0xFFF9 && c <= 0xFFFB) ||
	       (c >= 0xE0000 && c <= 0xE007F);
}

/* Copy untrusted bytes to out (at most outsize-1 bytes, NUL-terminated), every control or
 * invisible character made visible as an escape. Returns the length written. */
static size_t visible(const unsigned char *in, size_t n, char *out, size_t outsize)
{
	size_t o = 0;
	for (size_t i = 0; i < n;) {
		char esc[16];
		unsigned long cp;
		size_t len = utf8_seq(in + i, n - i, &cp);
		const char *piece;
		size_t plen;
		if (len == 0) {
			snprintf(esc, sizeof esc, "\\x%02x", in[i]);
			piece = esc, plen = strlen(esc), len = 1;
		} else if (cp == '\t' || cp == '\n' || cp == '\r') {
			esc[0] = '\\', esc[1] = cp == '\t' ? 't' : cp == '\n' ? 'n' : 'r', esc[2] = 0;
			piece = esc, plen = 2;
		} else if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F)) {
			snprintf(esc, sizeof esc, "\\x%02lx", cp);
			piece = esc, plen = strlen(esc);
		} else if (is_format_char(cp)) {
			snprintf(esc, sizeof esc, cp > 0xFFFF ? "\\U%08lx" : "\\u%04lx", cp);
			piece = esc, plen = strlen(esc);
		} else {
			piece = (const char *)in + i, plen = len;
		}
		if (o + plen >= outsize)
			break;
		memcpy(out + o, piece, plen);
		o += plen;
		i += len;
	}
	out[o] = 0;
	return o;
}

/* -- the tolerant framer (docs/protocol.md, "Receiving") -------------------------------------- */

struct framer {
	unsigned char buf[MAX_LINE];
	size_t len;
	int cutting;          /* dropping the rest of an overlong line */
	int padding;          /* dropping padding after a NUL */
	long long last;       /* when the last byte arrived */
};

typedef void (*on_message)(const unsigned char *msg, size_t n);

static void frame_complete(struct framer *f, on_message cb)
{
	cb(f->buf, f->len);
	f->len = 0;
	f->cutting = 0;
}

static void frame_take(struct framer *f, const unsigned char *p, size_t n)
{
	if (f->cutting)
		return;
	if (n > MAX_LINE - f->len) {
		n = MAX_LINE - f->len;
		f->cutting = 1;
	}
	memcpy(f->buf + f->len, p, n);
	f->len += n;
}

static void frame_feed(struct framer *f, const unsigned char *data, size_t n, long long now,
		       on_message cb)
{
	int pending = f->len > 0 || f->cutting;
	if (f->padding && now - f->last >= QUIET_MS)
		f->padding = 0;
	if (pending && now - f->last >= QUIET_MS)
		frame_complete(f, cb);
	f->last = now;
	for (size_t i = 0; i < n;) {
		if (f->padding)
			return; /* the rest of this burst is padding */
		const unsigned char *nl = memchr(data + i, '\n', n - i);
		const unsigned char *nul = memchr(data + i, '\0', n - i);
		if (!nl && !nul) {
			frame_take(f, data + i, n - i);
			return;
		}
		if (!nl || (nul && nul < nl)) {
			size_t k = nul - data;
			if (k > i || f->len > 0 || f->cutting) {
				frame_take(f, data + i, k - i);
				frame_complete(f, cb);
			}
			f->padding = 1;
			i = k + 1;
			continue;
		}
		size_t k = nl - data;
		frame_take(f, data + i, k - i);
		if (!f->cutting && f->len > 0 && f->buf[f->len - 1] == '\r')
			f->len--;
		frame_complete(f, cb);
		i = k + 1;
		if (i < n && data[i] == '\0')
			i++; /* "\n\0": the NUL belongs to the terminator */
	}
}

static void frame_flush(struct framer *f, long long now, int force, on_message cb)
{
	if ((f->len > 0 || f->cutting) && (force || now - f->last >= QUIET_MS))
		frame_complete(f, cb);
}

/* -- talking to the server ------------------------------------------------------------------- */

static int dial(const char *host, const char *port)
{
	struct addrinfo hints, *res, *ai;
	int fd = -1, err, saved = 0;
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	if ((err = getaddrinfo(host, port, &hints, &res)) != 0)
		die("cannot resolve %s: %s", host, gai_strerror(err));
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
		if (fd < 0) {
			saved = errno;
			continue;
		}
		while ((err = connect(fd, ai->ai_addr, ai->ai_addrlen)) < 0 && errno == EINTR)
			;
		if (err == 0)
			break;
		saved = errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		die("cannot connect to %s port %s: %s", host, port, strerror(saved));
	return fd;
}

/* Send all of buf; returns 0, or -1 if the connection is gone. */
static int send_all(const char *buf, size_t n)
{
	while (n > 0) {
		ssize_t w = send(sock, buf, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += w;
		n -= (size_t)w;
	}
	return 0;
}

static void send_message(const char *text)
{
	char out[4 * MAX_HANDLE + 1 + INPUT_MAX + 3];
	int n = snprintf(out, sizeof out, "%s>%s\n", handle, text);
	if (n < 0 || (size_t)n + 1 >= sizeof out)
		return;
	out[n] = '\0'; /* the NUL the original CS372 server expects after the newline */
	if (send_all(out, (size_t)n + 1) < 0) {
		printf("\nConnection to server lost: %s\n", strerror(errno));
		exit(1);
	}
}

static void leave(int status, const char *why)
{
	if (sock >= 0 && handle[0])
		send_message("\\quit");
	if (sock >= 0)
		close(sock);
	printf("%s\n", why);
	fflush(stdout);
	exit(status);
}

static int server_quit;
static int got_message;

/* Show one message from the server, prefix kept, text made visible. */
static void show(const unsigned char *msg, size_t n)
{
	static char out[MAX_LINE * 10 + 1];
	size_t i = 0, start = 0, a, b;
	while (i < n && i < 4 * MAX_HANDLE && msg[i] != '>' && msg[i] != ' ' && msg[i] != '\t')
		i++;
	if (i > 0 && i < n && msg[i] == '>' && utf8_len((const char *)msg, i) <= MAX_HANDLE)
		start = i + 1 + (i + 1 < n && msg[i + 1] == ' ');
	/* \quit, alone or after the prefix, surrounding white space ignored */
	for (a = start, b = n; a < b && (msg[a] == ' ' || msg[a] == '\t'); a++)
		;
	while (b > a && (msg[b - 1] == ' ' || msg[b - 1] == '\t'))
		b--;
	if (b - a == 5 && memcmp(msg + a, "\\quit", 5) == 0) {
		server_quit = 1;
		return;
	}
	if (start > 0) {
		visible(msg, i, out, sizeof out);
		fputs(out, stdout);
		fputc('>', stdout);
	}
	visible(msg + start, n - start, out, sizeof out);
	fputs(out, stdout);
	fputc('\n', stdout);
	fflush(stdout);
	got_message = 1;
}

/* Read from the socket into the framer; returns 0 while connected. */
static int receive(struct framer *f)
{
	unsigned char buf[65536];
	ssize_t r = recv(sock, buf, sizeof buf, 0);
	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return 0;
	if (r <= 0) {
		frame_flush(f, now_ms(), 1, show);
		if (server_quit)
			leave(0, "Disconnected from server");
		close(sock);
		sock = -1;
		printf("\n%s\n", r == 0 ? "Connection closed by server" : "Connection to server lost");
		fflush(stdout);
		exit(1);
	}
	frame_feed(f, buf, (size_t)r, now_ms(), show);
	return 0;
}

/* Unicode white space (Python's str.isspace()), which a handle may not contain. */
static int is_space(unsigned long c)
{
	return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
	       c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
	       c == 0x202F || c == 0x205F || c == 0x3000;
}

/* A handle: 1 to MAX_HANDLE valid UTF-8 code points, no white space, no '>', no control or
 * format character, and short enough in bytes for the handle buffer. */
static int valid_handle(const char *h, size_t n)
{
	size_t chars = 0;
	if (n == 0 || n >= sizeof handle)
		return 0;
	for (size_t i = 0; i < n; chars++) {
		unsigned long cp;
		size_t len = utf8_seq((const unsigned char *)h + i, n - i, &cp);
		if (len == 0 || cp == '>' || is_space(cp) || cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) ||
		    is_format_char(cp))
			return 0;
		i += len;
	}
	return chars <= MAX_HANDLE;
}

/* Read one line from the terminal into line; 1 for a line, 0 for EOF, -1 for too long. */
static int read_line(char *line, size_t size)
{
	size_t n = 0;
	int too_long = 0;
	for (;;) {
		char c;
		ssize_t r = read(STDIN_FILENO, &c, 1);
		if (r < 0 && errno == EINTR) {
			if (stop_signal)
				leave(0, "\nDisconnected from server");
			continue;
		}
		if (r <= 0)
			return n > 0 && !too_long ? (line[n] = 0, 1) : 0;
		if (c == '\n')
			break;
		if (n + 1 < size)
			line[n++] = c;
		else
			too_long = 1;
	}
	if (n > 0 && line[n - 1] == '\r')
		n--;
	line[n] = 0;
	return too_long ? -1 : 1;
}

int main(int argc, char **argv)
{
	long timeout_s = 0;
	int opt;
	struct sigaction sa;
	static struct framer f;
	char line[INPUT_MAX + 1];

	for (int i = 1; i < argc; i++)
		if (strcmp(argv[i], "--help") == 0)
			usage(stdout, 0);
	while ((opt = getopt(argc, argv, "ht:")) != -1) {
		char *end;
		switch (opt) {
		case 'h':
			usage(stdout, 0);
			break;
		case 't':
			timeout_s = strtol(optarg, &end, 10);
			if (*end || timeout_s <= 0)
				usage(stderr, 2);
			break;
		default:
			usage(stderr, 2);
		}
	}
	if (argc - optind != 2)
		usage(stderr, 2);
	const char *host = argv[optind], *port = argv[optind + 1];
	char *end;
	long p = strtol(port, &end, 10);
	if (!*port || *end || p < 1 || p > 65535 || strspn(port, "0123456789") != strlen(port))
		usage(stderr, 2);

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal; /* no SA_RESTART: poll and read return EINTR */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	printf("Connecting to %s port %s\n", host, port);
	fflush(stdout);
	sock = dial(host, port);

	for (;;) {
		fputs("What would you like your chat handle to be> ", stdout);
		fflush(stdout);
		int r = read_line(line, sizeof line);
		if (r == 0)
			leave(0, "\nDisconnected from server");
		if (r > 0 && valid_handle(line, strlen(line))) {
			memcpy(handle, line, strlen(line) + 1);
			break;
		}
		puts("A handle is 1 to 10 characters, with no spaces and no '>'.");
	}

	for (;;) {
		/* The user's turn: watch the keyboard and the socket together. */
		fputs(handle, stdout);
		fputc('>', stdout);
		fflush(stdout);
		got_message = 0;
		for (;;) {
			struct pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {sock, POLLIN, 0}};
			if (stop_signal)
				leave(0, "\nDisconnected from server");
			int n = poll(fds, 2, f.len ? QUIET_MS : -1);
			if (n < 0 && errno == EINTR)
				continue;
			if (fds[1].revents) {
				receive(&f);
				frame_flush(&f, now_ms(), 0, show);
			} else if (f.len) {
				frame_flush(&f, now_ms(), 0, show);
			}
			if (server_quit)
				leave(0, "\nDisconnected from server");
			if (got_message) { /* the server spoke out of turn: show its line, prompt again */
				fputs(handle, stdout);
				fputc('>', stdout);
				fflush(stdout);
				got_message = 0;
			}
			if (fds[0].revents)
				break;
		}
		int r = read_line(line, sizeof line);
		if (r == 0) {
			fputc('\n', stdout);
			leave(0, "Disconnected from server");
		}
		size_t chars = r > 0 ? utf8_len(line, strlen(line)) : INPUT_MAX;
		if (r < 0 || chars > MAX_TEXT) {
			if (r < 0)
				printf("Message too long (more than %d characters, at most %d); not sent.\n",
				       INPUT_MAX, MAX_TEXT);
			else
				printf("Message too long (%zu characters, at most %d); not sent.\n", chars,
				       MAX_TEXT);
			continue;
		}
		if (line[0] == 0)
			continue;
		if (strcmp(line, "\\quit") == 0)
			leave(0, "Disconnected from server");
		send_message(line);

		/* The server's turn: wait for its answer. */
		long long deadline = timeout_s ? now_ms() + timeout_s * 1000 : 0;
		got_message = 0;
		while (!got_message) {
			struct pollfd fds[1] = {{sock, POLLIN, 0}};
			int wait = -1;
			if (stop_signal)
				leave(0, "\nDisconnected from server");
			if (f.len)
				wait = QUIET_MS;
			if (deadline) {
				long long left = deadline - now_ms();
				if (left <= 0) {
					printf("No answer from the server in %ld seconds; leaving.\n", timeout_s);
					leave(1, "Disconnected from server");
				}
				if (wait < 0 || left < wait)
					wait = (int)left;
			}
			int n = poll(fds, 1, wait);
			if (n < 0 && errno == EINTR)
				continue;
			if (n > 0)
				receive(&f);
			frame_flush(&f, now_ms(), 0, show);
			if (server_quit)
				leave(0, "Disconnected from server");
		}
	}
}
