/* chatclient: a chat client for the CS372 chat protocol and chatlog's notices (docs/protocol.md).
 *
 * Shaped like suckless sic: dial() connects, then one poll() loop watches the keyboard and the
 * socket together. Bytes from the server go through a pure framer (tolerant framing: newline or
 * NUL ends a message, NUL padding is dropped, an unterminated burst completes after 150 ms of
 * quiet) and a pure parser; a printer shows each parsed line with every control or invisible
 * character made visible (the table in unsafe.h is generated from chatlog/sanitize.py). In 1:1
 * mode a turn flag says whether the user may send; in a room everybody types at any time. Every
 * way out goes through end(), which gives the terminal back and prints the one final line.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "unsafe.h"

#define MAX_HANDLE 10     /* code points */
#define MAX_TEXT 500      /* code points */
#define MAX_LINE 8192     /* bytes: a longer received line is cut here */
#define QUIET_MS 150      /* quiet time that completes an unterminated burst */
#define GRACE_MS 100      /* wait this long for a busy refusal before asking for a handle */
#define INPUT_MAX 4096    /* bytes of one typed line */
#define HANDSHAKE_S 10    /* TLS: seconds a handshake may take unless -t says otherwise */
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static const char usage_text[] =
	"usage: chatclient [-t SECONDS] [--tls [--ca FILE | --pin SHA256:HEX]\n"
	"                  [--identity FILE | --no-identity]] HOST PORT\n"
	"Chat with a chatlog (CS372 chat) server at HOST:PORT. You speak first; type \\quit\n"
	"or press Ctrl-D to leave. -t gives up if the server does not answer in time.\n"
	"  --tls             speak TLS (1.2 or later); the server must prove it is HOST with a\n"
	"                    certificate from a CA this system trusts\n"
	"  --ca FILE         trust the CA certificates in FILE (PEM) instead of the system's\n"
	"  --pin SHA256:HEX  trust only the server certificate with this SHA-256 fingerprint\n"
	"  --identity FILE   present this key and certificate (PEM; made if missing) instead of\n"
	"                    ~/.config/chatlog/identity.pem (made on the first --tls use)\n"
	"  --no-identity     present no client certificate\n"
	"  -t SECONDS        with --tls, also how long the handshake may take (default 10)\n"
	"A server no CA vouches for (self-signed) is shown with its fingerprint and asked about once\n"
	"at a terminal, then remembered in ~/.config/chatlog/known_hosts (under $XDG_CONFIG_HOME if\n"
	"set); elsewhere it is refused unless pinned or remembered, and a remembered server whose\n"
	"certificate has changed is always refused.\n";

/* -- text: UTF-8 and the one sanitiser rule ---------------------------------------------------- */

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

/* Code points in s if it is valid UTF-8, else -1. */
static long utf8_count(const unsigned char *s, size_t n)
{
	long count = 0;
	unsigned long cp;
	for (size_t i = 0, len; i < n; i += len, count++)
		if ((len = utf8_seq(s + i, n - i, &cp)) == 0)
			return -1;
	return count;
}

/* Columns a character takes on a terminal, as wcwidth() says for the common cases: 2 for East
 * Asian wide and fullwidth characters and pictographs, 0 for combining marks, else 1. (The
 * terminal's own table is not reachable from here; this one covers the scripts and emoji people
 * type. The client only needs it to put the cursor back.) */
static int cp_width(unsigned long c)
{
	static const struct { unsigned long lo, hi; } zero[] = {
		{0x0300, 0x036F}, {0x0483, 0x0489}, {0x0591, 0x05BD}, {0x05BF, 0x05BF}, {0x05C1, 0x05C2},
		{0x05C4, 0x05C5}, {0x05C7, 0x05C7}, {0x0610, 0x061A}, {0x064B, 0x065F}, {0x0670, 0x0670},
		{0x06D6, 0x06DC}, {0x06DF, 0x06E4}, {0x06E7, 0x06E8}, {0x06EA, 0x06ED}, {0x0E31, 0x0E31},
		{0x0E34, 0x0E3A}, {0x0E47, 0x0E4E}, {0x1AB0, 0x1AFF}, {0x1DC0, 0x1DFF}, {0x20D0, 0x20FF},
		{0xFE20, 0xFE2F},
	}, wide[] = {
		{0x1100, 0x115F}, {0x231A, 0x231B}, {0x2329, 0x232A}, {0x23E9, 0x23EC}, {0x23F0, 0x23F0},
		{0x23F3, 0x23F3}, {0x25FD, 0x25FE}, {0x2614, 0x2615}, {0x2648, 0x2653}, {0x267F, 0x267F},
		{0x2693, 0x2693}, {0x26A1, 0x26A1}, {0x26AA, 0x26AB}, {0x26BD, 0x26BE}, {0x26C4, 0x26C5},
		{0x26CE, 0x26CE}, {0x26D4, 0x26D4}, {0x26EA, 0x26EA}, {0x26F2, 0x26F3}, {0x26F5, 0x26F5},
		{0x26FA, 0x26FA}, {0x26FD, 0x26FD}, {0x2705, 0x2705}, {0x270A, 0x270B}, {0x2728, 0x2728},
		{0x274C, 0x274C}, {0x274E, 0x274E}, {0x2753, 0x2755}, {0x2757, 0x2757}, {0x2795, 0x2797},
		{0x27B0, 0x27B0}, {0x27BF, 0x27BF}, {0x2B1B, 0x2B1C}, {0x2B50, 0x2B50}, {0x2B55, 0x2B55},
		{0x2E80, 0x303E}, {0x3041, 0x33FF}, {0x3400, 0x4DBF}, {0x4E00, 0x9FFF}, {0xA000, 0xA4CF},
		{0xA960, 0xA97F}, {0xAC00, 0xD7A3}, {0xF900, 0xFAFF}, {0xFE10, 0xFE19}, {0xFE30, 0xFE6F},
		{0xFF00, 0xFF60}, {0xFFE0, 0xFFE6}, {0x16FE0, 0x16FE4}, {0x17000, 0x18CFF}, {0x1B000, 0x1B2FF},
		{0x1F004, 0x1F004}, {0x1F0CF, 0x1F0CF}, {0x1F18E, 0x1F18E}, {0x1F191, 0x1F19A},
		{0x1F200, 0x1F202}, {0x1F210, 0x1F23B}, {0x1F240, 0x1F248}, {0x1F250, 0x1F251},
		{0x1F260, 0x1F265}, {0x1F300, 0x1F320}, {0x1F32D, 0x1F335}, {0x1F337, 0x1F37C},
		{0x1F37E, 0x1F393}, {0x1F3A0, 0x1F3CA}, {0x1F3CF, 0x1F3D3}, {0x1F3E0, 0x1F3F0},
		{0x1F3F4, 0x1F3F4}, {0x1F3F8, 0x1F43E}, {0x1F440, 0x1F440}, {0x1F442, 0x1F4FC},
		{0x1F4FF, 0x1F53D}, {0x1F54B, 0x1F54E}, {0x1F550, 0x1F567}, {0x1F57A, 0x1F57A},
		{0x1F595, 0x1F596}, {0x1F5A4, 0x1F5A4}, {0x1F5FB, 0x1F64F}, {0x1F680, 0x1F6C5},
		{0x1F6CC, 0x1F6CC}, {0x1F6D0, 0x1F6D2}, {0x1F6D5, 0x1F6D7}, {0x1F6DC, 0x1F6DF},
		{0x1F6EB, 0x1F6EC}, {0x1F6F4, 0x1F6FC}, {0x1F7E0, 0x1F7EB}, {0x1F7F0, 0x1F7F0},
		{0x1F90C, 0x1F93A}, {0x1F93C, 0x1F945}, {0x1F947, 0x1F9FF}, {0x1FA70, 0x1FAFF},
		{0x20000, 0x2FFFD}, {0x30000, 0x3FFFD},
	};
	for (size_t i = 0; i < NELEM(zero); i++)
		if (c >= zero[i].lo && c <= zero[i].hi)
			return 0;
	for (size_t i = 0; i < NELEM(wide); i++)
		if (c >= wide[i].lo && c <= wide[i].hi)
			return 2;
	return 1;
}

/* Columns s takes on screen (an invalid byte counts as one). */
static size_t columns(const unsigned char *s, size_t n)
{
	size_t count = 0;
	for (size_t i = 0, len; i < n; i += len) {
		unsigned long cp;
		len = utf8_seq(s + i, n - i, &cp);
		count += len ? (size_t)cp_width(cp) : 1;
		len += !len;
	}
	return count;
}

/* The sanitiser's rule (chatlog/sanitize.py, UNSAFE_RANGES): is c shown as an escape? */
static int unsafe(unsigned long c)
{
	size_t lo = 0, hi = NELEM(unsafe_ranges);
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (c < unsafe_ranges[mid].lo)
			hi = mid;
		else if (c > unsafe_ranges[mid].hi)
			lo = mid + 1;
		else
			return 1;
	}
	return 0;
}

/* Unicode white space (Python's str.isspace()). */
static int is_space(unsigned long c)
{
	return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
	       c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
	       c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Untrusted bytes as text a terminal shows literally: every unsafe character as the escape
 * visible() gives it, bytes that are not UTF-8 as \xNN. out holds at least 4 * n + 1 bytes. */
static size_t visible(const unsigned char *in, size_t n, char *out)
{
	size_t o = 0;
	for (size_t i = 0; i < n;) {
		unsigned long cp;
		size_t len = utf8_seq(in + i, n - i, &cp);
		if (len == 0) {
			o += sprintf(out + o, "\\x%02x", in[i]);
			len = 1;
		} else if (!unsafe(cp)) {
			memcpy(out + o, in + i, len);
			o += len;
		} else if (cp == '\t' || cp == '\n' || cp == '\r') {
			o += sprintf(out + o, "\\%c", cp == '\t' ? 't' : cp == '\n' ? 'n' : 'r');
		} else {
			o += sprintf(out + o, cp <= 0xFF ? "\\x%02lx" : cp <= 0xFFFF ? "\\u%04lx" : "\\U%08lx", cp);
		}
		i += len;
	}
	out[o] = 0;
	return o;
}

/* -- the tolerant framer (docs/protocol.md, "Receiving"): bytes in, messages out, no I/O ------- */

struct framer {
	unsigned char buf[MAX_LINE];  /* the message being collected */
	size_t len;
	int cutting;                  /* dropping the rest of an overlong line */
	int padding;                  /* dropping padding after a NUL */
	int complete;                 /* buf holds a finished message not yet handed out */
	int handed;                   /* buf was handed out: clear it before going on */
	long long last;               /* when the last burst arrived */
	const unsigned char *in;      /* the unread rest of the current burst */
	size_t inlen;
};

static int pending(const struct framer *f)
{
	return f->len > 0 || f->cutting;
}

static void take(struct framer *f, const unsigned char *p, size_t n)
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

/* A burst (what one recv() returned) arrives at time now. data must stay valid until
 * frame_next() has returned 0. */
static void frame_burst(struct framer *f, const unsigned char *data, size_t n, long long now)
{
	if (f->padding && now - f->last >= QUIET_MS)
		f->padding = 0;
	if (pending(f) && now - f->last >= QUIET_MS)
		f->complete = 1; /* the sender went quiet: what came before is a message */
	f->last = now;
	f->in = data;
	f->inlen = f->padding ? 0 : n; /* padding swallows a burst before the sender is quiet */
}

/* The sender has been quiet since the last burst (or, with force, the stream has ended). */
static void frame_quiet(struct framer *f, long long now, int force)
{
	if (pending(f) && (force || now - f->last >= QUIET_MS))
		f->complete = 1;
}

/* The next complete message: 1 with *msg and *n set (valid until the next call), or 0 when
 * the burst is used up. */
static int frame_next(struct framer *f, const unsigned char **msg, size_t *n)
{
	if (f->handed) { /* the message handed out last time is done with */
		f->len = 0;
		f->cutting = 0;
		f->handed = 0;
	}
	while (!f->complete && f->inlen > 0) {
		const unsigned char *d = f->in;
		const unsigned char *nl = memchr(d, '\n', f->inlen);
		const unsigned char *nul = memchr(d, '\0', nl ? (size_t)(nl - d) : f->inlen);
		if (!nl && !nul) {
			take(f, d, f->inlen);
			f->inlen = 0;
		} else if (nul) {
			size_t k = (size_t)(nul - d);
			f->complete = k > 0 || pending(f);
			take(f, d, k);
			f->padding = 1; /* the rest of this burst is padding */
			f->inlen = 0;
		} else {
			size_t k = (size_t)(nl - d);
			take(f, d, k);
			if (!f->cutting && f->len > 0 && f->buf[f->len - 1] == '\r')
				f->len--;
			if (++k < f->inlen && d[k] == '\0')
				k++; /* "\n\0": the NUL belongs to the terminator */
			f->in += k;
			f->inlen -= k;
			f->complete = 1;
		}
	}
	if (!f->complete)
		return 0;
	f->complete = 0;
	f->handed = 1;
	*msg = f->buf;
	*n = f->len;
	return 1;
}

/* -- the parser: one message to prefix, text and what it means, no I/O ------------------------- */

struct line {
	const unsigned char *prefix, *text;
	size_t plen, tlen;
	int quit;    /* \quit, alone or after the prefix */
	int notice;  /* "*** ": chatlog telling the person what is happening */
};

static void parse(const unsigned char *m, size_t n, struct line *l)
{
	size_t i = 0, chars = 0, a, b;
	memset(l, 0, sizeof *l);
	while (i < n && chars <= MAX_HANDLE && m[i] != '>') {
		unsigned long cp;
		size_t len = utf8_seq(m + i, n - i, &cp);
		if (len == 0)
			len = 1, cp = 0xFFFD;
		if (is_space(cp))
			break;
		i += len, chars++;
	}
	if (i > 0 && i < n && m[i] == '>' && chars <= MAX_HANDLE) {
		l->prefix = m, l->plen = i;
		i++;
		if (i < n && m[i] == ' ')
			i++;
	} else {
		i = 0;
	}
	l->text = m + i, l->tlen = n - i;
	for (a = 0, b = l->tlen; a < b && l->text[a] < 0x80 && is_space(l->text[a]); a++)
		;
	while (b > a && l->text[b - 1] < 0x80 && is_space(l->text[b - 1]))
		b--;
	l->quit = b - a == 5 && memcmp(l->text + a, "\\quit", 5) == 0;
	l->notice = l->tlen >= 4 && memcmp(l->text, "*** ", 4) == 0;
}

/* -- the screen: status lines above the line being typed ---------------------------------------- */

static struct {
	int tty;                  /* keyboard and screen are a terminal: raw input, redraws */
	int raw;                  /* the terminal is in our mode; restore saved on the way out */
	struct termios saved, mode; /* the terminal's own mode, and ours */
	const char *prompt;       /* shown before the input, or NULL */
	int shown;                /* prompt (and typed text) are on the screen's last line(s) */
	int dirty;                /* the typed text changed since it was drawn */
	size_t at;                /* columns from the prompt's start to the cursor, as drawn */
	unsigned char buf[INPUT_MAX];
	size_t len;
	size_t cur;               /* the cursor: a byte offset into buf, always between characters */
	int overflow;             /* more was typed than buf holds */
	int esc;                  /* in an escape sequence: 1 after ESC, 2 in ESC [ or ESC O */
	char seq[8];              /* that sequence's parameter bytes */
	size_t seqlen;
} ui;

/* The terminal's width, or "very wide" when it cannot be known. */
static size_t width(void)
{
	struct winsize ws;
	if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
		return ws.ws_col;
	return (size_t)-1 / 2;
}

static void hide_input(void)
{
	if (!ui.shown)
		return;
	if (ui.tty) {
		size_t up = ui.at / width(); /* the rows between the prompt's start and the cursor */
		fputc('\r', stdout);
		if (up)
			printf("\033[%zuA", up);
		fputs("\033[J", stdout);
	} else {
		fputc('\n', stdout);
	}
	ui.shown = 0;
}

/* The prompt and, on a terminal, what has been typed so far (made visible like any text), with
 * the cursor put where it is in the line. */
static void show_input(void)
{
	static char echo[4 * INPUT_MAX + 1];
	size_t end, w;
	if (ui.shown || !ui.prompt)
		return;
	ui.dirty = 0;
	fputs(ui.prompt, stdout);
	ui.at = columns((const unsigned char *)ui.prompt, strlen(ui.prompt));
	ui.shown = 1;
	if (!ui.tty)
		return;
	w = width();
	end = ui.at + columns((const unsigned char *)echo, visible(ui.buf, ui.len, echo));
	fputs(echo, stdout);
	ui.at += columns((const unsigned char *)echo, visible(ui.buf, ui.cur, echo));
	/* The cursor is now at column end. A line that exactly fills its last row leaves the
	 * cursor waiting at the right margin; a new line makes every position row = col / w. */
	if (end > 0 && end % w == 0)
		fputs("\r\n", stdout);
	if (ui.at != end) {
		if (end / w > ui.at / w)
			printf("\033[%zuA", end / w - ui.at / w);
		fputc('\r', stdout);
		if (ui.at % w)
			printf("\033[%zuC", ui.at % w);
	}
}

/* Print one status line above the input. */
static void say(const char *fmt, ...)
{
	va_list ap;
	hide_input();
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
}

/* -- state and the one way out ------------------------------------------------------------------ */

static volatile sig_atomic_t stop_signal;
static volatile sig_atomic_t suspend_signal; /* Ctrl-Z: give the terminal back, then stop */
static int sock = -1;
static int chatting;         /* connected: the final line goes to stdout */
static char handle[4 * MAX_HANDLE + 1];
static char prompt[sizeof handle + 1];
static char server_handle[sizeof handle];
static int room;             /* a room: no turns, lines from others at any time */
static int my_turn = 1;      /* 1:1: the user may send */
static int nlines;           /* lines received so far */
static char queued[INPUT_MAX + 1];
static int has_queued;
static long timeout_s;       /* -t: how long to wait for an answer, or 0 */
static long long deadline;   /* when to give up waiting for it, or 0 */
static struct framer fr;
static int securing;         /* TLS: 1 during the handshake, 2 while the user is asked to trust */
static long long grace_end;  /* until then, wait for a busy refusal before asking for a handle */
static int wake[2] = {-1, -1}; /* the self-pipe: a signal wakes poll() even between two calls */

/* -- the transport: plain TCP or TLS behind one small interface ----------------------------------
 * The loop, the sender and the way out call these alone, so the plain client is exactly the
 * socket calls it always made, and TLS is one more implementation of the same calls. */

struct transport {
	ssize_t (*recv)(void *buf, size_t n);                  /* as recv(): -1 and EAGAIN if nothing yet */
	ssize_t (*send)(const void *buf, size_t n, int flags); /* as send(MSG_NOSIGNAL | flags) */
	int (*pending)(void);       /* received bytes held where poll() cannot see them */
	short (*events)(void);      /* what the socket is polled for */
	const char *(*why)(int err); /* a failure, for the last line */
	void (*close)(void);        /* closes sock and sets it to -1 */
};

static ssize_t plain_recv(void *buf, size_t n) { return recv(sock, buf, n, 0); }
static ssize_t plain_send(const void *buf, size_t n, int flags) { return send(sock, buf, n, MSG_NOSIGNAL | flags); }
static int plain_pending(void) { return 0; }
static short plain_events(void) { return POLLIN; }
static const char *plain_why(int err) { return strerror(err); }
static void plain_close(void) { close(sock); sock = -1; }

static const struct transport plain = {plain_recv, plain_send, plain_pending, plain_events, plain_why, plain_close};
static const struct transport *xp = &plain;

/* TLS over the same socket, made non-blocking: OpenSSL may need to write while we read (a key
 * update) or read while we write, so each call says which way it waits (tls_want), and it reads
 * ahead: records it already holds do not wake poll(), so after each successful read the loop
 * reads again at once (tls_more) until OpenSSL says it wants the socket. */
static SSL_CTX *tls_ctx;
static SSL *tls;
static short tls_want = POLLIN;
static int tls_more;          /* the last read returned data: OpenSSL may hold more */
static int tls_broken;        /* a fatal error: no close_notify may be sent */
static char tls_error[300];   /* the last fatal error, for the last line */

static void tls_note_error(const char *what)
{
	unsigned long e = ERR_peek_last_error();
	const char *r = e ? ERR_reason_error_string(e) : NULL;
	tls_broken = 1;
	snprintf(tls_error, sizeof tls_error, "%s: %s", what, r ? r : "unknown error");
}

static ssize_t tls_recv(void *buf, size_t n)
{
	int r, e;
	ERR_clear_error();
	r = SSL_read(tls, buf, n > INT_MAX ? INT_MAX : (int)n);
	tls_more = r > 0;
	if (r > 0) {
		tls_want = POLLIN;
		return r;
	}
	e = SSL_get_error(tls, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		tls_want = e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
		errno = EAGAIN;
		return -1;
	}
	if (e == SSL_ERROR_ZERO_RETURN) /* close_notify, or (SSL_OP_IGNORE_UNEXPECTED_EOF) a bare close */
		return 0;
	tls_broken = 1;
	if (e == SSL_ERROR_SYSCALL)
		return errno ? -1 : 0;
	tls_note_error("TLS error");
	errno = EPROTO;
	return -1;
}

/* Blocks like send() on a blocking socket, but wakes for a signal (the self-pipe). */
static ssize_t tls_send(const void *buf, size_t n, int flags)
{
	int watch_wake = 1;
	for (;;) {
		int w, e;
		ERR_clear_error();
		w = SSL_write(tls, buf, n > INT_MAX ? INT_MAX : (int)n);
		if (w > 0)
			return w;
		e = SSL_get_error(tls, w);
		if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
			tls_broken = 1;
			if (e == SSL_ERROR_SSL)
				tls_note_error("TLS error");
			errno = e == SSL_ERROR_SYSCALL && errno ? errno : e == SSL_ERROR_SSL ? EPROTO : EPIPE;
			return -1;
		}
		if (flags & MSG_DONTWAIT) {
			errno = EAGAIN;
			return -1;
		}
		struct pollfd p[2] = {{sock, e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN, 0},
				      {watch_wake ? wake[0] : -1, POLLIN, 0}};
		if (poll(p, 2, -1) < 0 && errno != EINTR)
			return -1;
		if (stop_signal) {
			errno = EINTR;
			return -1;
		}
		if (p[1].revents)
			watch_wake = 0; /* Ctrl-Z: the loop stops us once this line is out */
	}
}

static int tls_pending(void) { return tls_more; }
static short tls_events(void) { return tls_want; }
static const char *tls_why(int err) { return err == EPROTO && tls_error[0] ? tls_error : strerror(err); }

/* Says goodbye properly (close_notify, without waiting for the server's), then lets go of
 * everything OpenSSL holds for the connection. */
static void tls_close(void)
{
	if (tls) {
		if (!tls_broken && SSL_is_init_finished(tls)) {
			ERR_clear_error();
			SSL_shutdown(tls);
		}
		SSL_free(tls);
		tls = NULL;
	}
	if (sock >= 0)
		close(sock);
	sock = -1;
}

static const struct transport tls_transport = {tls_recv, tls_send, tls_pending, tls_events, tls_why, tls_close};

/* Send all of buf; -1 if the connection is gone or a signal asks us to stop (a server that
 * does not read would otherwise hold us here for ever). */
static int send_all(const char *buf, size_t n, int flags)
{
	while (n > 0) {
		ssize_t w = xp->send(buf, n, flags);
		if (w < 0 && errno == EINTR && !stop_signal)
			continue;
		if (w < 0)
			return -1;
		buf += w;
		n -= (size_t)w;
		if (n > 0 && stop_signal && !(flags & MSG_DONTWAIT))
			return -1; /* a signal cut the send short after some bytes went */
	}
	return 0;
}

/* The one way out: say \quit if the chat is still up, give the terminal back, print the final
 * line (before the chat, an error on stderr; status 2 adds the usage) and exit. */
static void end(int status, const char *fmt, ...)
{
	FILE *out = chatting ? stdout : stderr;
	va_list ap;
	if (sock >= 0 && handle[0]) {
		char bye[sizeof handle + 8];
		int n = snprintf(bye, sizeof bye, "%s>\\quit\n", handle);
		send_all(bye, (size_t)n + 1, MSG_DONTWAIT); /* best effort; with the NUL */
	}
	if (sock >= 0)
		xp->close();
	if (has_queued && chatting && fmt) { /* never dropped without a word */
		static char text[4 * INPUT_MAX + 1];
		visible((const unsigned char *)queued, strlen(queued), text);
		has_queued = 0;
		say("Not sent (the server had not answered yet): %s", text);
	}
	SSL_CTX_free(tls_ctx);
	tls_ctx = NULL;
	hide_input();
	if (ui.raw)
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &ui.saved);
	if (fmt) {
		if (!chatting)
			fputs("chatclient: ", out);
		va_start(ap, fmt);
		vfprintf(out, fmt, ap);
		va_end(ap);
		fputc('\n', out);
	}
	if (status == 2)
		fputs(usage_text, stderr);
	fflush(stdout);
	exit(status);
}

static void on_signal(int sig)
{
	int saved = errno;
	if (sig == SIGTSTP)
		suspend_signal = 1;
	else
		stop_signal = sig;
	if (write(wake[1], "", 1) < 0) {
		/* full already: poll() will wake anyway */
	}
	errno = saved;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* -- talking to the server ---------------------------------------------------------------------- */

static int dial(const char *host, const char *port)
{
	struct addrinfo hints, *res, *ai;
	int fd = -1, err, saved = 0;
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	if ((err = getaddrinfo(host, port, &hints, &res)) != 0)
		end(1, "cannot resolve %s: %s", host, gai_strerror(err));
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
		if (fd < 0) {
			saved = errno;
			continue;
		}
		err = connect(fd, ai->ai_addr, ai->ai_addrlen);
		if (err < 0 && errno == EINTR) { /* a signal: Ctrl-C while a server keeps us waiting */
			close(fd);
			freeaddrinfo(res);
			end(1, "cannot connect to %s port %s: interrupted", host, port);
		}
		if (err == 0)
			break;
		saved = errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		end(1, "cannot connect to %s port %s: %s", host, port, strerror(saved));
	return fd;
}

static void lost(int err)
{
	const char *why = xp->why(err);
	char saved[sizeof tls_error];
	snprintf(saved, sizeof saved, "%s", why); /* the reason outlives the connection */
	if (sock >= 0)
		xp->close();
	end(1, "Connection to the server lost: %s.", saved);
}


static void send_text(const char *text)
{
	static char out[sizeof handle + INPUT_MAX + 4];
	int n = snprintf(out, sizeof out, "%s>%s\n", handle, text);
	if (send_all(out, (size_t)n + 1, 0) < 0) { /* with the NUL the original CS372 server expects */
		if (stop_signal)
			end(0, "You left the chat.");
		lost(errno);
	}
	fr.padding = 0; /* we spoke: the server's turn, so any padding from it has ended */
	if (!room) {
		my_turn = 0;
		deadline = timeout_s ? now_ms() + timeout_s * 1000 : 0;
	}
}

/* In a room, the handle is announced as soon as it is chosen (`handle>\join`), so the others
 * see who came in before that person says anything. Old servers never greet as a room, so
 * they never get it. */
static int announced;

static void announce(void)
{
	if (room && handle[0] && !announced) {
		announced = 1;
		send_text("\\join");
	}
}

/* A chatlog server that queued us (its `*** Waiting:` notice, which no other server sends) is
 * told once that we show notices whenever they come (`handle>\caps notify`, not a turn: nothing
 * answers it), so it says "your chat has begun" the moment we are served, not with its next
 * answer. That notice then is not an answer either. */
static int want_caps, said_caps;
static const char begun[] = "*** Your chat has begun.";

static void send_caps(void)
{
	char out[sizeof handle + 16];
	int n = snprintf(out, sizeof out, "%s>\\caps notify\n", handle);
	said_caps = 1;
	if (send_all(out, (size_t)n + 1, 0) < 0) { /* with the NUL, like every line */
		if (stop_signal)
			end(0, "You left the chat.");
		lost(errno);
	}
}

/* -- the printer: parsed lines from the server on the screen ------------------------------------ */

static char vis[4 * MAX_LINE + 1];
static char notice[4 * MAX_LINE + 1]; /* the text of the last notice, made visible */
static int held;                      /* that notice is not printed yet: it may explain a \quit */
static int after_notice;              /* the line before this one was a notice */
static int closed_mid_line;           /* the stream ended inside a line: the last one is cut */
static const char cut_mark[] = " [cut: connection closed mid-line]";

static void print_line(const struct line *l)
{
	char pre[4 * sizeof handle + 1];
	hide_input();
	if (l->prefix) {
		visible(l->prefix, l->plen, pre);
		printf("%s>", pre);
	}
	visible(l->text, l->tlen, vis);
	printf("%s%s\n", vis, closed_mid_line ? cut_mark : "");
}

static void print_held(void)
{
	if (held)
		say("[%s]%s", notice, closed_mid_line ? cut_mark : "");
	held = 0;
}

static int from_server(const struct line *l)
{
	return l->prefix && l->plen == strlen(server_handle) &&
	       memcmp(l->prefix, server_handle, l->plen) == 0;
}

/* One message from the server: 1 if it may be the answer the user waits for. */
static int on_message(const unsigned char *m, size_t n)
{
	struct line l;
	parse(m, n, &l);
	if (nlines++ == 0 && l.notice && memmem(l.text, l.tlen, "Welcome to the room", 19)) {
		room = 1;
		my_turn = 1;
		deadline = 0;
		if (l.prefix && l.plen < sizeof server_handle)
			memcpy(server_handle, l.prefix, l.plen);
		announce();
	}
	if (room && l.prefix && !from_server(&l))
		l.notice = l.quit = 0; /* in a room only the server's own lines are notices */
	if (l.quit) {
		xp->close();
		if (after_notice)
			end(0, "%s", notice);
		end(0, "The server closed the chat.");
	}
	print_held();
	after_notice = l.notice;
	if (l.notice) {
		visible(l.text + 4, l.tlen - 4, notice);
		held = 1;
	} else {
		print_line(&l);
	}
	if (!room && l.notice && !said_caps && l.tlen >= 12 && memcmp(l.text, "*** Waiting:", 12) == 0)
		want_caps = 1;
	return !(said_caps && l.notice && l.tlen == sizeof begun - 1 && memcmp(l.text, begun, l.tlen) == 0);
}

/* Everything the last burst (or the quiet) completed; in 1:1 mode, that was the answer. */
static void drain(void)
{
	const unsigned char *m;
	size_t n;
	int got = 0;
	while (frame_next(&fr, &m, &n))
		got |= on_message(m, n);
	print_held();
	if (want_caps && handle[0] && !said_caps)
		send_caps();
	want_caps = 0;
	if (!got || room || my_turn)
		return;
	my_turn = 1;
	deadline = 0;
	if (has_queued) {
		has_queued = 0;
		hide_input();
		visible((const unsigned char *)queued, strlen(queued), vis);
		printf("%s%s\n", prompt, vis);
		send_text(queued);
	}
}

static void receive(void)
{
	static unsigned char buf[65536];
	ssize_t r = xp->recv(buf, sizeof buf);
	int err = errno;
	if (r < 0 && (err == EINTR || err == EAGAIN))
		return;
	if (r <= 0) {
		/* The stream ended: an unterminated last line is all there will be of it, but not
		 * necessarily all of it (a reader dropped as slow may be cut mid-line): it is shown
		 * marked as cut, never as if it had been said that way. */
		closed_mid_line = pending(&fr);
		frame_quiet(&fr, 0, 1);
		drain();
		if (r == 0) {
			xp->close();
			end(1, "Connection closed by the server.");
		}
		lost(err);
	}
	frame_burst(&fr, buf, (size_t)r, now_ms());
	drain();
}

/* -- TLS: who the server is, and who we are ------------------------------------------------------
 * The handshake runs in the loop like everything else (securing == 1: the socket is polled for
 * what OpenSSL wants, until hs_deadline). Verification never aborts the handshake: the callback
 * notes what is wrong and the decision is made once the certificate is in hand, because a
 * self-signed server is judged by its fingerprint (--pin, known_hosts, or the user at a
 * terminal: securing == 2), not by a CA. */

static int use_tls, no_identity;
static const char *ca_file, *identity_file;
static char pin[65];            /* --pin, as 64 lower-case hex digits */
static const char *peer_host, *peer_port;
static char hostport[NI_MAXHOST + 16]; /* host:port, [v6]:port: the known_hosts name */
static char known_file[PATH_MAX];
static char server_fp[65];
static long long hs_deadline;
static short hs_want = POLLOUT;
static int v_untrusted, v_other, v_hostname; /* what the verify callback saw */

/* "SHA256:AB:cd..." or bare hex, colons optional, any case: 64 lower-case hex digits, or 0. */
static int parse_fp(const char *s, char out[65])
{
	size_t n = 0;
	if (strncasecmp(s, "SHA256:", 7) == 0)
		s += 7;
	for (; *s; s++) {
		if (*s == ':')
			continue;
		if (!isxdigit((unsigned char)*s) || n == 64)
			return 0;
		out[n++] = (char)tolower((unsigned char)*s);
	}
	out[n] = 0;
	return n == 64;
}

static void fingerprint(X509 *x, char out[65])
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int n = 0;
	X509_digest(x, EVP_sha256(), md, &n);
	for (unsigned int i = 0; i < n && i < 32; i++)
		sprintf(out + 2 * i, "%02x", md[i]);
}

/* $XDG_CONFIG_HOME/chatlog/NAME, else ~/.config/chatlog/NAME. */
static void config_path(const char *name, char *out, size_t size)
{
	const char *xdg = getenv("XDG_CONFIG_HOME"), *home = getenv("HOME");
	if (xdg && xdg[0] == '/')
		snprintf(out, size, "%s/chatlog/%s", xdg, name);
	else if (home && home[0])
		snprintf(out, size, "%s/.config/chatlog/%s", home, name);
	else
		end(1, "cannot find a place for %s: neither HOME nor XDG_CONFIG_HOME is set", name);
}

/* The directories above path, made 0700 where missing (they hold a private key). */
static void make_parents(const char *path)
{
	char dir[PATH_MAX];
	snprintf(dir, sizeof dir, "%s", path);
	for (char *p = strchr(dir + 1, '/'); p; p = strchr(p + 1, '/')) {
		*p = 0;
		if (mkdir(dir, 0700) < 0 && errno != EEXIST)
			end(1, "cannot make %s: %s", dir, strerror(errno));
		*p = '/';
	}
}

/* A new key (EC P-256) and a self-signed certificate for it, in one PEM file made 0600. */
static void make_identity(const char *path)
{
	EVP_PKEY *key = EVP_EC_gen("P-256");
	X509 *x = X509_new();
	X509_NAME *name = x ? X509_get_subject_name(x) : NULL;
	BIGNUM *serial = BN_new();
	char tmp[PATH_MAX + 8], fp[65];
	int ok = key && x && name && serial && BN_rand(serial, 63, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) &&
		 BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x)) && X509_set_version(x, 2) &&
		 X509_gmtime_adj(X509_getm_notBefore(x), -3600) &&
		 X509_time_adj_ex(X509_getm_notAfter(x), 3650, 0, NULL) && X509_set_pubkey(x, key) &&
		 X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"chatclient", -1, -1, 0) &&
		 X509_set_issuer_name(x, name) && X509_sign(x, key, EVP_sha256());
	BN_free(serial);
	if (!ok) {
		EVP_PKEY_free(key);
		X509_free(x);
		end(1, "cannot make a key for %s: %s", path, ERR_reason_error_string(ERR_peek_last_error()));
	}
	make_parents(path);
	snprintf(tmp, sizeof tmp, "%s.XXXXXX", path);
	int fd = mkstemp(tmp); /* 0600 */
	FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
	int saved = errno;
	ok = f && PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL) && PEM_write_X509(f, x) &&
	     fflush(f) == 0 && fsync(fd) == 0;
	saved = ok ? 0 : errno ? errno : saved;
	if (f)
		fclose(f);
	else if (fd >= 0)
		close(fd);
	/* link, not rename: a client starting at the same moment may have made one; keep that */
	if (ok && link(tmp, path) < 0 && errno != EEXIST)
		ok = 0, saved = errno;
	if (fd >= 0)
		unlink(tmp);
	fingerprint(x, fp);
	EVP_PKEY_free(key);
	X509_free(x);
	if (!ok)
		end(1, "cannot write %s: %s", path, strerror(saved));
	printf("Made your TLS identity %s (SHA256:%s).\n", path, fp);
}

static int note_verify(int ok, X509_STORE_CTX *store)
{
	int e = X509_STORE_CTX_get_error(store);
	if (ok)
		return 1;
	switch (e) {
	case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
	case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
	case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
	case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
	case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
	case X509_V_ERR_CERT_UNTRUSTED:
		if (!v_untrusted)
			v_untrusted = e;
		break;
	case X509_V_ERR_HOSTNAME_MISMATCH:
	case X509_V_ERR_IP_ADDRESS_MISMATCH:
		v_hostname = e;
		break;
	default:
		if (!v_other)
			v_other = e;
	}
	return 1; /* decided in check_server(), with the whole picture */
}

/* The context for --tls: made before connecting, so a new identity is said before anything. */
static void tls_setup(void)
{
	char path[PATH_MAX];
	tls_ctx = SSL_CTX_new(TLS_client_method());
	if (!tls_ctx || !SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION))
		end(1, "cannot set up TLS: %s", ERR_reason_error_string(ERR_peek_last_error()));
	/* A bare close is an end like any other: the chat says \quit in the stream itself. */
	SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
	SSL_CTX_set_read_ahead(tls_ctx, 1);
	if (ca_file ? SSL_CTX_load_verify_locations(tls_ctx, ca_file, NULL) != 1
		    : SSL_CTX_set_default_verify_paths(tls_ctx) != 1)
		end(1, "cannot read CA certificates%s%s: %s", ca_file ? " from " : "", ca_file ? ca_file : "",
		    ERR_reason_error_string(ERR_peek_last_error()));
	SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_PEER, note_verify);
	if (no_identity)
		return;
	if (identity_file)
		snprintf(path, sizeof path, "%s", identity_file);
	else
		config_path("identity.pem", path, sizeof path);
	if (access(path, F_OK) < 0 && errno == ENOENT)
		make_identity(path);
	ERR_clear_error();
	if (SSL_CTX_use_certificate_chain_file(tls_ctx, path) != 1 ||
	    SSL_CTX_use_PrivateKey_file(tls_ctx, path, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_check_private_key(tls_ctx) != 1) {
		unsigned long e = ERR_peek_last_error();
		end(1, "cannot use the identity %s: %s", path,
		    errno && !e ? strerror(errno) : ERR_reason_error_string(e));
	}
}

static void tls_start(const char *host, const char *port)
{
	unsigned char addr[16];
	int ip = inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
	peer_host = host, peer_port = port;
	snprintf(hostport, sizeof hostport, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
	for (char *p = hostport; *p; p++)
		*p = (char)tolower((unsigned char)*p);
	if (!(tls = SSL_new(tls_ctx)) || !SSL_set_fd(tls, sock))
		end(1, "cannot set up TLS: %s", ERR_reason_error_string(ERR_peek_last_error()));
	if (ip) /* an address is checked against the certificate's IP names; SNI carries names only */
		X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(tls), host);
	else if (!SSL_set1_host(tls, host) || !SSL_set_tlsext_host_name(tls, host))
		end(1, "cannot set up TLS for %s: %s", host, ERR_reason_error_string(ERR_peek_last_error()));
	fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK);
	xp = &tls_transport;
	securing = 1;
	hs_deadline = now_ms() + (timeout_s ? timeout_s : HANDSHAKE_S) * 1000;
}

static void secured(void)
{
	securing = 0;
	chatting = 1;
	tls_want = POLLIN;
	tls_more = 1; /* the server's first lines may have come with the handshake */
	grace_end = now_ms() + GRACE_MS;
}

/* Where a remembered certificate for hostport is: 1 it is fp, 0 none, -1 another (*line, old). */
static int known_lookup(const char *fp, int *line, char old[65])
{
	char buf[1024];
	int n = 0, found = 0;
	FILE *f = fopen(known_file, "r");
	if (!f)
		return 0;
	while (fgets(buf, sizeof buf, f)) {
		char *name, *key, *save, k[65];
		n++;
		if (!(name = strtok_r(buf, " \t\r\n", &save)) || name[0] == '#' || !(key = strtok_r(NULL, " \t\r\n", &save)))
			continue;
		if (strcasecmp(name, hostport) != 0 || !parse_fp(key, k)) /* host names ignore case */
			continue;
		if (strcmp(k, fp) == 0) {
			fclose(f);
			return 1;
		}
		if (!found) {
			found = n;
			memcpy(old, k, sizeof k);
		}
	}
	fclose(f);
	*line = found;
	return found ? -1 : 0;
}

static void known_add(void)
{
	int fd;
	make_parents(known_file);
	fd = open(known_file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0 || dprintf(fd, "%s SHA256:%s\n", hostport, server_fp) < 0)
		say("(could not remember it in %s: %s)", known_file, strerror(errno));
	else
		say("Remembered %s as SHA256:%s in %s.", hostport, server_fp, known_file);
	if (fd >= 0)
		close(fd);
}

/* The handshake is done: is this the server we meant? */
static void check_server(void)
{
	X509 *cert = SSL_get0_peer_certificate(tls);
	char old[65];
	int line = 0, k;
	const char *what;
	if (!cert)
		end(1, "%s port %s presented no certificate", peer_host, peer_port);
	fingerprint(cert, server_fp);
	if (pin[0]) {
		if (strcmp(server_fp, pin) != 0)
			end(1, "%s port %s presented certificate SHA256:%s, not the pinned SHA256:%s: refusing to connect",
			    peer_host, peer_port, server_fp, pin);
		secured();
		return;
	}
	if (!v_untrusted) { /* a CA we trust vouches for it: then every check must pass */
		if (v_hostname)
			end(1, "cannot verify %s port %s: its certificate is not for the name %s (hostname mismatch)",
			    peer_host, peer_port, peer_host);
		if (v_other)
			end(1, "cannot verify %s port %s: %s", peer_host, peer_port, X509_verify_cert_error_string(v_other));
		secured();
		return;
	}
	/* No CA vouches for it: it is known by its fingerprint, as SSH knows hosts. */
	config_path("known_hosts", known_file, sizeof known_file);
	k = known_lookup(server_fp, &line, old);
	if (k > 0) {
		secured();
		return;
	}
	if (k < 0) {
		fprintf(stderr,
			"@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
			"@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
			"@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
			"IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
			"Someone could be listening to you right now (a man-in-the-middle attack),\n"
			"or the server's certificate has just been changed.\n"
			"The certificate remembered for %s is\n  SHA256:%s\n"
			"and the server presented\n  SHA256:%s\n"
			"If you know why it changed, delete line %d of %s (or pass --pin).\n",
			hostport, old, server_fp, line, known_file);
		end(1, "the certificate of %s has changed (%s:%d): refusing to connect", hostport, known_file, line);
	}
	what = v_untrusted == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT ? "a self-signed certificate"
									 : "a certificate from an unknown CA";
	if (!ui.tty)
		end(1, "cannot verify %s port %s: %s (%s), SHA256:%s; not at a terminal to ask: "
		    "pass --pin SHA256:%s if that is the server's, or --ca FILE",
		    peer_host, peer_port, what, X509_verify_cert_error_string(v_untrusted), server_fp, server_fp);
	say("The authenticity of %s can't be established: it presented %s.", hostport, what);
	say("Its fingerprint is SHA256:%s", server_fp);
	ui.prompt = "Are you sure you want to trust it and remember it (yes/no)? ";
	securing = 2;
}

/* One step of the handshake, when the socket is ready for it. */
static void handshake(void)
{
	int r, e, reason;
	unsigned long err;
	ERR_clear_error();
	errno = 0;
	r = SSL_connect(tls);
	if (r == 1) {
		check_server();
		return;
	}
	e = SSL_get_error(tls, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		hs_want = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
		return;
	}
	tls_broken = 1;
	err = ERR_peek_last_error();
	reason = ERR_GET_REASON(err);
	if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && errno == 0) ||
	    reason == SSL_R_UNEXPECTED_EOF_WHILE_READING)
		end(1, "%s port %s closed the connection during the TLS handshake", peer_host, peer_port);
	if (e == SSL_ERROR_SYSCALL)
		end(1, "TLS handshake with %s port %s failed: %s", peer_host, peer_port, strerror(errno));
	if (reason == SSL_R_WRONG_VERSION_NUMBER || reason == SSL_R_PACKET_LENGTH_TOO_LONG ||
	    reason == SSL_R_RECORD_LENGTH_MISMATCH || reason == SSL_R_HTTP_REQUEST ||
	    reason == SSL_R_UNKNOWN_PROTOCOL || reason == SSL_R_WRONG_SSL_VERSION)
		end(1, "%s port %s does not speak TLS (is it a plain chat port?)", peer_host, peer_port);
	end(1, "TLS handshake with %s port %s failed: %s", peer_host, peer_port,
	    err ? ERR_reason_error_string(err) : "unknown error");
}

/* The answer to the trust question. */
static void confirm(const char *line)
{
	if (strcasecmp(line, "yes") == 0) {
		ui.prompt = NULL;
		known_add();
		secured();
	} else if (strcasecmp(line, "no") == 0) {
		end(1, "%s not trusted: not connecting", hostport);
	} else {
		ui.prompt = "Please type 'yes' or 'no': ";
	}
}

/* -- the keyboard: a line editor on a terminal, plain lines from a pipe or file ------------------ */

static const char ask_handle[] = "What would you like your chat handle to be> ";
static unsigned char inbuf[4096];
static size_t inpos, inlen;
static int in_eof;
static int asked;            /* the grace time is over: the user is asked for input */

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
		if (len == 0 || cp == '>' || is_space(cp) || unsafe(cp))
			return 0;
		i += len;
	}
	return chars <= MAX_HANDLE;
}

static int is_quit(const char *s, size_t n)
{
	while (n > 0 && (*s == ' ' || *s == '\t'))
		s++, n--;
	while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
		n--;
	return n == 5 && memcmp(s, "\\quit", 5) == 0;
}

/* The lines sent (or queued) in this run, oldest first, for Up and Down. Fixed storage: a line
 * that may be sent is at most MAX_TEXT code points. */
#define HISTORY 100
static char history[HISTORY][4 * MAX_TEXT + 1];
static int hist_n, hist_first; /* how many are kept; where the oldest is */
static int hist_at;            /* the line shown: 0..hist_n-1, or hist_n for the one being typed */
static unsigned char draft[INPUT_MAX]; /* the line being typed, while an older one is shown */
static size_t draft_len;

static void remember(const char *line, size_t n)
{
	int slot;
	if (n >= sizeof history[0])
		return;
	if (hist_n < HISTORY) {
		slot = (hist_first + hist_n++) % HISTORY;
	} else {
		slot = hist_first;
		hist_first = (hist_first + 1) % HISTORY;
	}
	memcpy(history[slot], line, n + 1);
	hist_at = hist_n;
}

/* Say why a typed line was not sent; at a terminal it stays on the input line to be edited. */
#define KEPT (ui.tty ? " It is kept below for editing." : "")

/* One line the user typed: the handle, \quit, or a message. Returns 1 when the line was refused
 * and should stay on the input line. */
static int on_input(char *line, size_t n, int overflow)
{
	long chars;
	if (securing) {
		confirm(line);
		return 0;
	}
	if (!handle[0]) {
		if (overflow || !valid_handle(line, n)) {
			say("A handle is 1 to 10 characters, with no spaces, no '>' and no control characters.");
			return 0;
		}
		memcpy(handle, line, n + 1);
		snprintf(prompt, sizeof prompt, "%s>", handle);
		ui.prompt = prompt;
		announce();
		return 0;
	}
	if (!overflow && is_quit(line, n))
		end(0, "You left the chat.");
	if (overflow)
		say("Message too long (more than %d bytes, at most %d characters); not sent.%s", INPUT_MAX, MAX_TEXT,
		    ui.tty ? " Its first 4096 bytes are kept below for editing." : "");
	else if (n == 0)
		return 0;
	else if (memchr(line, 0, n))
		say("Not sent: the message contains a NUL byte.%s", KEPT);
	else if ((chars = utf8_count((unsigned char *)line, n)) < 0)
		say("Not sent: the message is not valid UTF-8.%s", KEPT);
	else if (chars > MAX_TEXT)
		say("Message too long (%ld characters, at most %d); not sent.%s", chars, MAX_TEXT, KEPT);
	else if (!room && !my_turn && has_queued)
		say("Not sent: a line is already queued; wait for the server's answer.%s", KEPT);
	else {
		remember(line, n);
		if (!room && !my_turn) {
			memcpy(queued, line, n + 1);
			has_queued = 1;
			say("(queued: will be sent when the server answers)");
		} else {
			send_text(line);
		}
		return 0;
	}
	return 1;
}

static void submit(void)
{
	char line[INPUT_MAX + 1];
	size_t n = ui.len;
	int overflow = ui.overflow;
	memcpy(line, ui.buf, n);
	if (n > 0 && line[n - 1] == '\r')
		n--;
	line[n] = 0;
	if (ui.tty) { /* drawn whole, the cursor at its end (typed ahead before the prompt was drawn, too) */
		ui.cur = ui.len;
		hide_input();
		show_input();
	}
	ui.len = ui.cur = 0;
	ui.overflow = 0;
	hist_at = hist_n;
	if (ui.shown && (!ui.tty || ui.at % width() != 0))
		fputc('\n', stdout); /* what was typed stays on the screen as the user's line */
	ui.shown = 0;
	if (on_input(line, n, overflow) && ui.tty && handle[0]) {
		memcpy(ui.buf, line, n); /* refused: back on the input line, to be edited */
		ui.len = ui.cur = n;
	}
}

/* -- editing: the cursor moves over whole characters (a valid UTF-8 sequence, or one byte) ---- */

static size_t one_char(size_t i, unsigned long *cp)
{
	size_t n = utf8_seq(ui.buf + i, ui.len - i, cp);
	if (n == 0)
		*cp = 0xFFFD;
	return i + (n ? n : 1);
}

/* After the character at i, with the combining marks that go with it (one step for the user). */
static size_t next_char(size_t i)
{
	unsigned long cp;
	size_t j;
	if (i >= ui.len)
		return i;
	i = one_char(i, &cp);
	while (i < ui.len && (j = one_char(i, &cp)) && cp_width(cp) == 0 && !unsafe(cp))
		i = j;
	return i;
}

static size_t prev_char(size_t i)
{
	size_t p = 0, q = 0;
	while (q < i)
		p = q, q = next_char(q);
	return p;
}

static int is_blank(unsigned char c)
{
	return c == ' ' || c == '\t';
}

static size_t word_left(size_t i)
{
	while (i > 0 && is_blank(ui.buf[i - 1]))
		i--;
	while (i > 0 && !is_blank(ui.buf[i - 1]))
		i--;
	return i; /* after a blank (one byte) or at 0: a character's start */
}

static size_t word_right(size_t i)
{
	while (i < ui.len && is_blank(ui.buf[i]))
		i = next_char(i);
	while (i < ui.len && !is_blank(ui.buf[i]))
		i = next_char(i);
	return i;
}

/* Remove buf[a, b) (both on character starts); the cursor goes to a. */
static void cut(size_t a, size_t b)
{
	memmove(ui.buf + a, ui.buf + b, ui.len - b);
	ui.len -= b - a;
	ui.cur = a;
	ui.overflow = 0;
}

static void set_line(const void *text, size_t n)
{
	memcpy(ui.buf, text, n);
	ui.len = ui.cur = n;
	ui.overflow = 0;
}

/* Up (-1) and Down (+1) through the lines sent in this run. */
static void recall(int step)
{
	if ((step < 0 && hist_at == 0) || (step > 0 && hist_at >= hist_n))
		return;
	if (hist_at == hist_n) {
		memcpy(draft, ui.buf, ui.len);
		draft_len = ui.len;
	}
	hist_at += step;
	if (hist_at == hist_n) {
		set_line(draft, draft_len);
	} else {
		const char *h = history[(hist_first + hist_at) % HISTORY];
		set_line(h, strlen(h));
	}
}

/* The key an escape sequence names (ESC [ params final, or ESC O final). */
static void escape_key(unsigned char final)
{
	const char *p = ui.seq;
	int mod = strchr(p, ';') != NULL; /* Ctrl- or Alt-: by words */
	switch (final) {
	case 'D': ui.cur = mod ? word_left(ui.cur) : prev_char(ui.cur); break;
	case 'C': ui.cur = mod ? word_right(ui.cur) : next_char(ui.cur); break;
	case 'A': recall(-1); break;
	case 'B': recall(1); break;
	case 'H': ui.cur = 0; break;
	case 'F': ui.cur = ui.len; break;
	case '~':
		if (!strcmp(p, "1") || !strcmp(p, "7"))
			ui.cur = 0;
		else if (!strcmp(p, "4") || !strcmp(p, "8"))
			ui.cur = ui.len;
		else if (!strcmp(p, "3") && ui.cur < ui.len)
			cut(ui.cur, next_char(ui.cur));
		break;
	default: /* a key we do not use */
		break;
	}
}

/* One control key. */
static void control_key(unsigned char c)
{
	switch (c) {
	case 0x7F: case 0x08: /* Backspace, Ctrl-H */
		if (ui.cur > 0)
			cut(prev_char(ui.cur), ui.cur);
		else
			ui.overflow = 0;
		break;
	case 0x04: /* Ctrl-D: leave on an empty line, else delete the character under the cursor */
		if (ui.len == 0)
			end(0, "You left the chat.");
		if (ui.cur < ui.len)
			cut(ui.cur, next_char(ui.cur));
		break;
	case 0x01: ui.cur = 0; break;                           /* Ctrl-A */
	case 0x05: ui.cur = ui.len; break;                      /* Ctrl-E */
	case 0x02: ui.cur = prev_char(ui.cur); break;           /* Ctrl-B */
	case 0x06: ui.cur = next_char(ui.cur); break;           /* Ctrl-F */
	case 0x10: recall(-1); break;                           /* Ctrl-P */
	case 0x0E: recall(1); break;                            /* Ctrl-N */
	case 0x15: cut(0, ui.cur); break;                       /* Ctrl-U: to the start */
	case 0x0B: ui.len = ui.cur; ui.overflow = 0; break;     /* Ctrl-K: to the end */
	case 0x17: cut(word_left(ui.cur), ui.cur); break;       /* Ctrl-W: the word before */
	case 0x1B: ui.esc = 1; ui.seqlen = 0; return;
	default: return; /* a control key we do not use */
	}
	ui.dirty = 1;
}

/* One byte from the keyboard. */
static void on_key(unsigned char c)
{
	if (ui.esc == 2) { /* ESC [ or ESC O, parameter bytes, then a final byte */
		if (c >= 0x20 && c < 0x40) {
			if (ui.seqlen < sizeof ui.seq - 1)
				ui.seq[ui.seqlen++] = (char)c;
			return;
		}
		ui.esc = 0;
		ui.seq[ui.seqlen] = 0;
		if (c >= 0x40 && c < 0x7F) {
			escape_key(c);
			ui.dirty = 1;
		}
		return;
	}
	if (ui.esc == 1) {
		ui.esc = 0;
		if (c == '[' || c == 'O') {
			ui.esc = 2;
			return;
		}
		if (c == 'b' || c == 'f') { /* Alt-B, Alt-F: by words */
			ui.cur = c == 'b' ? word_left(ui.cur) : word_right(ui.cur);
			ui.dirty = 1;
			return;
		}
		if (c >= 0x20)
			return; /* Alt and another key: dropped; ESC and a control key: the control key */
	}
	if (c == '\n' || (ui.tty && c == '\r')) {
		submit();
		return;
	}
	if (ui.tty && (c < 0x20 || c == 0x7F)) {
		control_key(c);
		return;
	}
	if (ui.len == sizeof ui.buf) {
		ui.overflow = 1; /* refused at Enter; the rest of the line never leaks into the next */
		return;
	}
	memmove(ui.buf + ui.cur + 1, ui.buf + ui.cur, ui.len - ui.cur);
	ui.buf[ui.cur++] = c;
	ui.len++;
	if (ui.cur < ui.len) { /* inserted before a character: the cursor stays on a character's start */
		size_t q = 0;
		while (q < ui.cur)
			q = next_char(q);
		ui.cur = q;
	}
	ui.dirty = 1;
}

/* May typed input be taken now? From a pipe, lines wait there until it is the user's turn. */
static int accepting(void)
{
	return (asked || securing == 2) && (ui.tty || room || my_turn || !handle[0]);
}

/* Ctrl-Z: the terminal as it was, stop; when continued, our mode again and the input redrawn. */
static void suspend(void)
{
	char drain[64];
	while (read(wake[0], drain, sizeof drain) > 0)
		;
	suspend_signal = 0;
	hide_input();
	fflush(stdout);
	tcsetattr(STDIN_FILENO, TCSADRAIN, &ui.saved);
	signal(SIGTSTP, SIG_DFL);
	raise(SIGTSTP); /* stops here until SIGCONT */
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigaction(SIGTSTP, &sa, NULL);
	tcsetattr(STDIN_FILENO, TCSADRAIN, &ui.mode);
}

static void take_input(void)
{
	while (accepting() && inpos < inlen)
		on_key(inbuf[inpos++]);
	if (ui.dirty && ui.tty)
		hide_input(); /* drawn again, as it is now, before the loop waits */
	if (accepting() && inpos == inlen && in_eof) {
		if (!ui.tty && (ui.len > 0 || ui.overflow))
			submit(); /* from a pipe or file, a last line with no newline (a terminal that
				   * hangs up sends nothing half typed) */
		else
			end(0, "You left the chat.");
	}
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	char *e;
	int opt;

	/* A standard descriptor left closed by whoever started us (`>&-`, `<&-`) would be taken
	 * by the socket, and the screen's lines would go to the server. Hold each on /dev/null. */
	for (int fd = 0; fd <= 2; fd++)
		if (fcntl(fd, F_GETFD) < 0 && errno == EBADF && open("/dev/null", fd ? O_WRONLY : O_RDONLY) != fd)
			return 1;

	for (int i = 1; i < argc && strcmp(argv[i], "--"); i++)
		if (strcmp(argv[i], "--help") == 0) {
			fputs(usage_text, stdout);
			end(0, NULL);
		}
	enum { TLS = 256, CA, PIN, IDENTITY, NO_IDENTITY };
	static const struct option longs[] = {
		{"tls", no_argument, NULL, TLS},
		{"ca", required_argument, NULL, CA},
		{"pin", required_argument, NULL, PIN},
		{"identity", required_argument, NULL, IDENTITY},
		{"no-identity", no_argument, NULL, NO_IDENTITY},
		{NULL, 0, NULL, 0},
	};
	opterr = 0;
	while ((opt = getopt_long(argc, argv, "+ht:", longs, NULL)) != -1) {
		if (opt == TLS) {
			use_tls = 1;
		} else if (opt == CA) {
			ca_file = optarg;
		} else if (opt == PIN) {
			if (!parse_fp(optarg, pin))
				end(2, "--pin '%s' is not SHA256: and 64 hex digits", optarg);
		} else if (opt == IDENTITY) {
			identity_file = optarg;
		} else if (opt == NO_IDENTITY) {
			no_identity = 1;
		} else if (opt == 'h') {
			fputs(usage_text, stdout);
			end(0, NULL);
		} else if (opt == 't') {
			errno = 0;
			timeout_s = strtol(optarg, &e, 10);
			if (!*optarg || *e || errno || timeout_s < 1 || timeout_s > 1000000)
				end(2, "-t '%s' is not a number of seconds (1-1000000)", optarg);
		} else if (optopt == 't') {
			end(2, "-t needs a number of seconds");
		} else if (optopt >= CA && optopt <= IDENTITY) {
			end(2, "%s needs %s", argv[optind - 1], optopt == PIN ? "SHA256:HEX" : "a FILE");
		} else if (optopt == 0) {
			end(2, "unknown option '%s'", argv[optind - 1]);
		} else {
			end(2, "unknown option '-%c'", optopt);
		}
	}
	if (!use_tls && (ca_file || pin[0] || identity_file || no_identity))
		end(2, "--ca, --pin, --identity and --no-identity go with --tls");
	if (identity_file && no_identity)
		end(2, "--identity and --no-identity contradict each other");
	if (argc - optind < 2)
		end(2, argc == optind ? "missing HOST and PORT" : "missing PORT");
	if (argc - optind > 2)
		end(2, "too many arguments: expected HOST and PORT");
	const char *host = argv[optind], *port = argv[optind + 1];
	errno = 0;
	long p = strtol(port, &e, 10);
	if (!*port || *e || errno || p < 1 || p > 65535 || strspn(port, "0123456789") != strlen(port))
		end(2, "port '%s' is not a number (1-65535)", port);

	if (pipe(wake) < 0 || fcntl(wake[0], F_SETFL, O_NONBLOCK) < 0 || fcntl(wake[1], F_SETFL, O_NONBLOCK) < 0)
		end(1, "cannot make a pipe: %s", strerror(errno));
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal; /* no SA_RESTART: poll() returns EINTR */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGQUIT, &sa, NULL); /* Ctrl-\\ too: never leave the terminal in our mode */
	signal(SIGPIPE, SIG_IGN);

	ui.tty = isatty(STDIN_FILENO) && isatty(STDOUT_FILENO) && tcgetattr(STDIN_FILENO, &ui.saved) == 0;
	if (ui.tty) { /* our own line editor: keys one by one, no echo; Ctrl-C still signals */
		struct termios t = ui.saved;
		t.c_lflag &= ~(tcflag_t)(ICANON | ECHO);
		t.c_cc[VMIN] = 1;
		t.c_cc[VTIME] = 0;
		ui.mode = t;
		ui.raw = ui.tty = tcsetattr(STDIN_FILENO, TCSANOW, &ui.mode) == 0;
	}
	if (ui.tty)
		sigaction(SIGTSTP, &sa, NULL);

	if (use_tls)
		tls_setup();
	printf("Connecting to %s port %s\n", host, port);
	fflush(stdout);
	sock = dial(host, port);
	if (use_tls)
		tls_start(host, port); /* chatting once the server is verified */
	else
		chatting = 1;
	grace_end = now_ms() + GRACE_MS; /* a busy refusal comes at once */

	for (;;) {
		long long now = now_ms();
		int wait = -1, held_back;
		if (securing == 1) /* each step as soon as the socket allows, first the ClientHello */
			handshake();
		if (!asked && !securing && now >= grace_end) {
			asked = 1;
			ui.prompt = ask_handle;
		}
		take_input();
		if (ui.prompt && (ui.tty || accepting()))
			show_input();
		fflush(stdout);

		if (!asked && !securing)
			wait = (int)(grace_end - now);
		if (securing == 1) {
			long long left = hs_deadline - now;
			wait = left < 0 ? 0 : wait < 0 || left < wait ? (int)left : wait;
		}
		held_back = !securing && xp->pending();
		if (held_back)
			wait = 0; /* received already, but poll() will not say so */
		if (pending(&fr)) {
			long long left = fr.last + QUIET_MS - now;
			wait = left < 0 ? 0 : wait < 0 || left < wait ? (int)left : wait;
		}
		if (deadline) {
			long long left = deadline - now;
			wait = left < 0 ? 0 : wait < 0 || left < wait ? (int)left : wait;
		}
		struct pollfd fds[3] = {
			{securing == 2 ? -1 : sock, securing ? hs_want : xp->events(), 0},
			{accepting() && inpos == inlen && !in_eof ? STDIN_FILENO : -1, POLLIN, 0},
			{wake[0], POLLIN, 0},
		};
		int n = poll(fds, 3, wait), err = errno;
		if (stop_signal)
			end(0, "You left the chat.");
		if (suspend_signal)
			suspend();
		if (n < 0 && err != EINTR)
			end(1, "poll: %s", strerror(err));
		if (securing == 1 && now_ms() >= hs_deadline)
			end(1, "TLS handshake with %s port %s timed out after %ld s (is it a TLS port?)", host, port,
			    timeout_s ? timeout_s : HANDSHAKE_S);
		if (!securing && ((n > 0 && fds[0].revents) || held_back))
			receive();
		frame_quiet(&fr, now_ms(), 0);
		drain();
		if (deadline && now_ms() >= deadline)
			end(1, "No answer from the server in %ld s: you left the chat.", timeout_s);
		if (n > 0 && fds[1].revents) {
			ssize_t r = read(STDIN_FILENO, inbuf, sizeof inbuf);
			if (r > 0)
				inpos = 0, inlen = (size_t)r;
			else if (r == 0 || (errno != EINTR && errno != EAGAIN))
				in_eof = 1;
		}
	}
}
