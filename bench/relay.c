/* The trivial relay the room load generator is calibrated against: epoll, one process, no
 * framing beyond "complete lines", no store, no console. Each client is greeted with one line, and
 * every complete line a client sends is queued for every other client; after each pass over the
 * ready sockets, each client's queue goes out in one blocking write (the generator always reads).
 * What the generator measures against it is the generator's own ceiling, not a server's.
 *
 * Usage: relay PORT   (127.0.0.1; PORT 0 picks one; prints "port N" and flushes)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXFD 65536
#define BUF 262144

static char *partial[MAXFD]; /* an incomplete line carried over from the last read */
static size_t plen[MAXFD];
static int live[MAXFD];
static int maxfd;
static char *out[MAXFD]; /* queued for this client during the current pass */
static size_t olen[MAXFD], ocap[MAXFD];

static void queue(int fd, const char *p, size_t n) {
    if (olen[fd] + n > ocap[fd]) {
        ocap[fd] = (olen[fd] + n) * 2;
        out[fd] = realloc(out[fd], ocap[fd]);
    }
    memcpy(out[fd] + olen[fd], p, n);
    olen[fd] += n;
}

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    live[fd] = 0;
    free(partial[fd]);
    partial[fd] = NULL;
    plen[fd] = 0;
    olen[fd] = 0;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return; /* the reader is gone: its read side will notice */
        }
        p += w;
        n -= (size_t)w;
    }
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(argc > 1 ? atoi(argv[1]) : 0)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096) ||
        getsockname(ls, (struct sockaddr *)&a, &al)) {
        perror("relay");
        return 1;
    }
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[BUF];
    static const char greet[] = "SERVER>*** Welcome to the relay.\n";
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c = accept(ls, NULL, NULL);
                if (c < 0 || c >= MAXFD) {
                    if (c >= 0)
                        close(c);
                    continue;
                }
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                ev.data.fd = c;
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                live[c] = 1;
                if (c > maxfd)
                    maxfd = c;
                write_all(c, greet, sizeof greet - 1);
                continue;
            }
            ssize_t r = recv(fd, buf, BUF, 0);
            if (r <= 0) {
                drop(ep, fd);
                continue;
            }
            char *end = memrchr(buf, '\n', (size_t)r);
            if (!end) { /* no complete line yet: keep it */
                partial[fd] = realloc(partial[fd], plen[fd] + (size_t)r);
                memcpy(partial[fd] + plen[fd], buf, (size_t)r);
                plen[fd] += (size_t)r;
                continue;
            }
            size_t whole = (size_t)(end - buf) + 1;
            for (int o = 0; o <= maxfd; o++) {
                if (!live[o] || o == fd)
                    continue;
                if (plen[fd])
                    queue(o, partial[fd], plen[fd]);
                queue(o, buf, whole);
            }
            free(partial[fd]);
            partial[fd] = NULL;
            plen[fd] = (size_t)r - whole;
            if (plen[fd]) {
                partial[fd] = malloc(plen[fd]);
                memcpy(partial[fd], buf + whole, plen[fd]);
            }
        }
        for (int o = 0; o <= maxfd; o++) {
            if (olen[o] && live[o])
                write_all(o, out[o], olen[o]);
            olen[o] = 0;
        }
    }
}
