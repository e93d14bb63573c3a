/*
 * echo_server: a minimal single-threaded epoll echo server, the "speed limit"
 * baseline for LibIPC benchmarks.
 *
 *   echo_server unix PATH
 *   echo_server tcp HOST PORT
 *
 * It echoes back exactly the bytes it receives. Since LibIPC frames are
 * (u32 BE length, payload), echoing the raw byte stream echoes whole messages
 * without parsing them.
 *
 * Design: level-triggered epoll; one shared 256 KiB read buffer; whatever a
 * write could not take is copied into a per-connection pending buffer, and
 * that connection stops being read (EPOLLIN off, EPOLLOUT on) until the
 * pending bytes are drained. An idle connection costs only a small struct.
 * SIGTERM/SIGINT end the loop cleanly (the unix socket path is unlinked).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define RBUF_SIZE (256 * 1024)
#define MAX_EVENTS 512
#define READS_PER_EVENT 8

struct conn {
    char *pend;   /* bytes read but not yet written back */
    size_t plen;  /* valid bytes in pend (from poff) */
    size_t poff;
    size_t pcap;
    int active;
};

static struct conn *conns;
static size_t nconns_cap;
static int epfd = -1;
static int lfd = -1;
static int is_tcp;
static int reserve_fd = -1;
static volatile sig_atomic_t stop_flag;
static char rbuf[RBUF_SIZE];
static unsigned long n_open, n_accepted;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void die(const char *what)
{
    fprintf(stderr, "echo_server: %s: %s\n", what, strerror(errno));
    exit(1);
}

static struct conn *get_conn(int fd)
{
    if ((size_t)fd >= nconns_cap) {
        size_t ncap = nconns_cap ? nconns_cap : 1024;
        while (ncap <= (size_t)fd)
            ncap *= 2;
        struct conn *n = realloc(conns, ncap * sizeof(*n));
        if (!n) {
            fprintf(stderr, "echo_server: out of memory\n");
            exit(1);
        }
        memset(n + nconns_cap, 0, (ncap - nconns_cap) * sizeof(*n));
        conns = n;
        nconns_cap = ncap;
    }
    return &conns[fd];
}

static void close_conn(int fd)
{
    struct conn *c = get_conn(fd);
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(c->pend);
    memset(c, 0, sizeof(*c));
    n_open--;
}

static void set_events(int fd, uint32_t ev)
{
    struct epoll_event e = {.events = ev, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &e) < 0)
        die("epoll_ctl MOD");
}

/* Keep the unwritten tail [p, p+n) in the connection's pending buffer. */
static void keep_pending(struct conn *c, const char *p, size_t n)
{
    if (c->pcap < n) {
        free(c->pend);
        size_t cap = n < 4096 ? 4096 : n;
        c->pend = malloc(cap);
        if (!c->pend) {
            fprintf(stderr, "echo_server: out of memory\n");
            exit(1);
        }
        c->pcap = cap;
    }
    memcpy(c->pend, p, n);
    c->plen = n;
    c->poff = 0;
}

static void handle_read(int fd)
{
    struct conn *c = get_conn(fd);
    for (int i = 0; i < READS_PER_EVENT; i++) {
        ssize_t n = read(fd, rbuf, sizeof(rbuf));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            close_conn(fd);
            return;
        }
        if (n == 0) {
            close_conn(fd);
            return;
        }
        size_t off = 0;
        while (off < (size_t)n) {
            ssize_t w = write(fd, rbuf + off, (size_t)n - off);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                close_conn(fd);
                return;
            }
            off += (size_t)w;
        }
        if (off < (size_t)n) {
            /* Partial write: buffer the rest, stop reading until drained. */
            keep_pending(c, rbuf + off, (size_t)n - off);
            set_events(fd, EPOLLOUT);
            return;
        }
        if ((size_t)n < sizeof(rbuf))
            return; /* most likely drained; level-triggered epoll re-arms */
    }
}

static void handle_write(int fd)
{
    struct conn *c = get_conn(fd);
    while (c->plen > 0) {
        ssize_t w = write(fd, c->pend + c->poff, c->plen);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            close_conn(fd);
            return;
        }
        c->poff += (size_t)w;
        c->plen -= (size_t)w;
    }
    /* Release big buffers (keep small ones for reuse). */
    if (c->pcap > 65536) {
        free(c->pend);
        c->pend = NULL;
        c->pcap = 0;
    }
    set_events(fd, EPOLLIN);
}

static void handle_accept(void)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EMFILE || errno == ENFILE) {
                /* Out of descriptors: accept and drop one so the level-
                 * triggered listener does not spin. */
                if (reserve_fd >= 0) {
                    close(reserve_fd);
                    int t = accept(lfd, NULL, NULL);
                    if (t >= 0)
                        close(t);
                    reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                }
                fprintf(stderr, "echo_server: accept: %s (connection dropped)\n",
                        strerror(errno));
                return;
            }
            die("accept");
        }
        if (is_tcp) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        struct conn *c = get_conn(fd);
        memset(c, 0, sizeof(*c));
        c->active = 1;
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0)
            die("epoll_ctl ADD");
        n_open++;
        n_accepted++;
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: echo_server unix PATH\n"
            "       echo_server tcp HOST PORT\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *unix_path = NULL;

    if (argc == 3 && strcmp(argv[1], "unix") == 0) {
        unix_path = argv[2];
    } else if (argc == 4 && strcmp(argv[1], "tcp") == 0) {
        is_tcp = 1;
    } else {
        usage();
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);

    sigset_t block, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &waitmask);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    if (unix_path) {
        struct sockaddr_un sun;
        memset(&sun, 0, sizeof(sun));
        sun.sun_family = AF_UNIX;
        if (strlen(unix_path) >= sizeof(sun.sun_path)) {
            fprintf(stderr, "echo_server: unix path too long\n");
            return 2;
        }
        strcpy(sun.sun_path, unix_path);
        struct stat st;
        if (lstat(unix_path, &st) == 0) {
            if (!S_ISSOCK(st.st_mode)) {
                fprintf(stderr, "echo_server: %s exists and is not a socket\n", unix_path);
                return 1;
            }
            unlink(unix_path); /* stale socket */
        }
        lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (lfd < 0)
            die("socket");
        if (bind(lfd, (struct sockaddr *)&sun, sizeof(sun)) < 0)
            die("bind");
    } else {
        struct addrinfo hints, *res, *ai;
        memset(&hints, 0, sizeof(hints));
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_PASSIVE;
        int rc = getaddrinfo(argv[2], argv[3], &hints, &res);
        if (rc != 0) {
            fprintf(stderr, "echo_server: %s:%s: %s\n", argv[2], argv[3], gai_strerror(rc));
            return 1;
        }
        for (ai = res; ai; ai = ai->ai_next) {
            lfd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                         ai->ai_protocol);
            if (lfd < 0)
                continue;
            int one = 1;
            setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
            if (bind(lfd, ai->ai_addr, ai->ai_addrlen) == 0)
                break;
            close(lfd);
            lfd = -1;
        }
        freeaddrinfo(res);
        if (lfd < 0)
            die("bind");
    }
    if (listen(lfd, 4096) < 0)
        die("listen");

    reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event le = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &le) < 0)
        die("epoll_ctl ADD listener");

    if (unix_path)
        fprintf(stderr, "echo_server: listening on unix %s\n", unix_path);
    else
        fprintf(stderr, "echo_server: listening on tcp %s %s\n", argv[2], argv[3]);

    struct epoll_event evs[MAX_EVENTS];
    while (!stop_flag) {
        int n = epoll_pwait(epfd, evs, MAX_EVENTS, -1, &waitmask);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            uint32_t ev = evs[i].events;
            if (fd == lfd) {
                handle_accept();
                continue;
            }
            if (!get_conn(fd)->active)
                continue; /* closed earlier in this batch */
            struct conn *c = get_conn(fd);
            if (c->plen > 0) {
                if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    handle_write(fd);
            } else if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                handle_read(fd);
            }
        }
    }

    for (size_t fd = 0; fd < nconns_cap; fd++)
        if (conns[fd].active)
            close_conn((int)fd);
    close(lfd);
    if (unix_path)
        unlink(unix_path);
    fprintf(stderr, "echo_server: exiting (%lu connections served)\n", n_accepted);
    return 0;
}
