/*
 * loadgen: single-threaded epoll load generator for LibIPC servers.
 *
 * Speaks the LibIPC stream (u32 BE length + payload) over a unix or TCP
 * socket, optionally after the TCPd handshake (NAME -> "ok"), inside TLS
 * (OpenSSL), and/or as WebSocket binary messages (one masked frame per
 * message, payload only). Modes:
 *
 *   ping-pong (default)  N connections x K messages in flight, for a duration
 *                        or a message count; latency histogram, rate, MB/s.
 *   --connect-rate       N parallel loops of connect(+TLS)(+WS)(+handshake),
 *                        one round trip, close; connections/s and latency of
 *                        the whole cycle.
 *   --hold N             open N connections, one round trip each, keep them
 *                        idle for --hold-seconds while "HOLDING N" is on
 *                        stdout, then close.
 *
 * Output: one JSON line on stdout. Errors: message on stderr, exit != 0.
 * See README.md for examples.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* ------------------------------------------------------------------------ */
/* configuration                                                             */

enum mode { MODE_PINGPONG, MODE_CONNRATE, MODE_HOLD };

static struct {
    const char *unix_path;
    const char *tcp_spec;
    char host[256]; /* as given, without brackets */
    char port[16];
    const char *handshake;
    int tls;
    const char *ca;
    const char *sni;
    const char *ws_path;
    int ws_stream;
    int ws_ipc;
    long connections;
    uint64_t size;
    long inflight;
    double duration;
    uint64_t count; /* 0 = duration mode */
    double warmup;
    int verify;
    enum mode mode;
    long hold;
    double hold_seconds;
    int graceful_close;
    int quiet;
} cfg = {
    .connections = 1,
    .size = 64,
    .inflight = 1,
    .duration = 5.0,
    .warmup = 0.5,
    .hold_seconds = 5.0,
};

static struct sockaddr_storage target_addr;
static socklen_t target_len;
static int target_family;
static SSL_CTX *ssl_ctx;

/* ------------------------------------------------------------------------ */
/* utilities                                                                 */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        fatal("out of memory (%zu bytes)", n);
    return p;
}

static void *xcalloc(size_t a, size_t b)
{
    void *p = calloc(a ? a : 1, b ? b : 1);
    if (!p)
        fatal("out of memory");
    return p;
}

static const char *ssl_errstr(void)
{
    static char buf[256];
    unsigned long e = ERR_get_error();
    if (!e)
        return errno ? strerror(errno) : "unknown TLS error";
    ERR_error_string_n(e, buf, sizeof(buf));
    ERR_clear_error();
    return buf;
}

static inline uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The --verify pattern: each connection owns a pseudo-random block of
 * size + PAT_SPAN bytes; message seq carries the size bytes that start at
 * pat_off(seq), so consecutive messages differ and nothing is generated per
 * message (senders point at the block, the checker memcmp()s against it). */
#define PAT_SPAN 4093

static void gen_payload(uint8_t *dst, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0xD6E8FEB86659FD93ull ^ 0x5DEECE66Dull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w = splitmix64(&s);
        memcpy(dst + i, &w, 8);
    }
    if (i < n) {
        uint64_t w = splitmix64(&s);
        memcpy(dst + i, &w, n - i);
    }
}

static uint8_t ws_mask_key[4];

static void ws_mask(uint8_t *p, size_t n, const uint8_t key[4])
{
    uint64_t k64;
    uint8_t k8[8];
    for (int i = 0; i < 8; i++)
        k8[i] = key[i & 3];
    memcpy(&k64, k8, 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        w ^= k64;
        memcpy(p + i, &w, 8);
    }
    for (; i < n; i++)
        p[i] ^= key[i & 3];
}

/* Client frame header (FIN set, masked). Returns its length (<= 14). */
static size_t ws_header(uint8_t *h, uint64_t len, int opcode, const uint8_t key[4])
{
    size_t n;
    h[0] = (uint8_t)(0x80 | opcode);
    if (len < 126) {
        h[1] = (uint8_t)(0x80 | len);
        n = 2;
    } else if (len < 65536) {
        h[1] = 0x80 | 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        n = 4;
    } else {
        h[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        n = 10;
    }
    memcpy(h + n, key, 4);
    return n + 4;
}

/* ------------------------------------------------------------------------ */
/* latency histogram: log buckets, 128 sub-buckets per power of two (<0.4%)  */

#define H_SUB 128
#define H_BUCKETS (2 * H_SUB + 56 * H_SUB)

struct hist {
    uint64_t b[H_BUCKETS];
    uint64_t n, max, min;
    double sum;
};

static inline int hist_index(uint64_t v)
{
    if (v < 2 * H_SUB)
        return (int)v;
    int e = 63 - __builtin_clzll(v); /* >= 8 */
    uint64_t top = v >> (e - 7);     /* 128..255 */
    return 2 * H_SUB + (e - 8) * H_SUB + (int)(top - H_SUB);
}

static inline double hist_value(int idx)
{
    if (idx < 2 * H_SUB)
        return idx;
    int e = (idx - 2 * H_SUB) / H_SUB + 8;
    uint64_t top = (uint64_t)((idx - 2 * H_SUB) % H_SUB + H_SUB);
    double lo = (double)(top << (e - 7));
    double width = (double)(1ull << (e - 7));
    return lo + width / 2;
}

static void hist_add(struct hist *h, uint64_t v)
{
    h->b[hist_index(v)]++;
    h->n++;
    h->sum += (double)v;
    if (v > h->max)
        h->max = v;
    if (h->n == 1 || v < h->min)
        h->min = v;
}

static double hist_pct(const struct hist *h, double p)
{
    if (!h->n)
        return 0;
    uint64_t target = (uint64_t)ceil(p * (double)h->n);
    if (target < 1)
        target = 1;
    uint64_t acc = 0;
    for (int i = 0; i < H_BUCKETS; i++) {
        acc += h->b[i];
        if (acc >= target) {
            double v = hist_value(i);
            if (v > (double)h->max)
                v = (double)h->max;
            if (v < (double)h->min)
                v = (double)h->min;
            return v;
        }
    }
    return (double)h->max;
}

static struct hist lat;

/* ------------------------------------------------------------------------ */
/* connections                                                               */

enum state {
    ST_FREE,
    ST_RETRY,      /* waiting to (re)try connect() */
    ST_CONNECTING, /* non-blocking connect in progress */
    ST_TLS,        /* TLS client handshake */
    ST_WS_SEND,    /* sending the HTTP upgrade request */
    ST_WS_RECV,    /* reading the 101 response */
    ST_HS_SEND,    /* sending the LibIPC handshake NAME */
    ST_HS_RECV,    /* waiting for "ok" */
    ST_RUN,        /* exchanging messages */
    ST_DEAD,
};

static const char *state_name[] = {"free",         "retry",       "connecting",
                                   "tls-handshake", "ws-send",     "ws-recv",
                                   "handshake-send", "handshake-recv", "run",
                                   "dead"};

struct conn {
    int idx;
    int fd;
    enum state st;
    SSL *ssl;
    uint32_t events;        /* current epoll interest (0 = not registered) */
    int want_out;           /* a write hit EAGAIN */
    int rd_wants_wr;        /* SSL_read wants the socket writable */
    uint64_t t_start;       /* connect() start (connect-rate / hold) */
    uint64_t last_progress; /* loop time of the last progress */
    uint64_t retry_at;
    int retry_delay_ms;
    int keep_t_start;

    /* setup I/O */
    char *sbuf;
    size_t slen, soff;
    char *hbuf;
    size_t hlen;
    char ws_accept[64];
    char hsr[16];
    size_t hsr_len;

    /* send side: messages [send_seq, next_seq) are queued */
    uint64_t send_seq, next_seq;
    size_t send_off; /* bytes of message send_seq already written */
    uint8_t ctrl[140];
    size_t ctrl_len, ctrl_off;
    uint8_t *pat;    /* --verify: pattern block */
    uint8_t *genbuf; /* --verify with --ws: masked frame of message gen_seq */
    uint64_t gen_seq;
    int gen_valid;
    uint8_t *stage; /* TLS: bytes handed to SSL_write */
    size_t stage_cap, stage_len, stage_off;
    uint64_t *sent_at; /* ring, indexed by seq % inflight */

    /* receive side */
    uint64_t recv_seq;
    uint32_t outstanding;
    uint8_t hdr[4];
    int hdr_got;
    uint64_t msg_len;
    uint64_t msg_off;
    int in_msg;
    int msg_bad;
    const uint8_t *expect; /* --verify: expected payload of recv_seq */
    /* websocket frame parser */
    uint8_t fh[14];
    int fh_got, fh_need;
    uint64_t fpay_left;
    int fmasked;
    uint8_t fmask[4];
    uint64_t fmask_pos;
    int fop, ffin, in_frame;
    int ws_in_data_msg;
    uint8_t cin[128];
    size_t cin_len;

    /* accounting */
    uint64_t measure_from_seq;
    uint64_t measured; /* messages (or cycles) completed in the window */
    int finished;
    int held;
};

static struct conn *conns;
static long nconns;
static int epfd;
static uint8_t *tmpl; /* frame used for every message without --verify */
static size_t frame_len, frame_hdr_len, ring_len;
static uint8_t gbuf[256 * 1024];
static uint64_t loop_now;
static uint64_t last_cycle_done; /* connect-rate: loop time of the last complete cycle */

enum phase { PH_SETUP, PH_WARMUP, PH_MEASURE, PH_HOLDING, PH_DONE };
static enum phase phase = PH_SETUP;
static uint64_t t_setup_start, t_ready, t_measure_start, t_measure_end, t_end_deadline;
static uint64_t t_hold_end;
static struct rusage ru_start, ru_end;
static uint64_t total_errors, total_mismatches, total_completed_measured;
static long n_ready, n_setting_up, next_to_start, n_finished, n_alive, n_retry_pending;
static long n_held;
static int ever_ready;
static int errors_printed;

#define MAX_SETUP_CONCURRENCY 256
#define PROGRESS_TIMEOUT_NS (10ull * 1000000000ull)

static void conn_start(struct conn *c);
static void conn_ready(struct conn *c);
static void conn_close(struct conn *c);
static void conn_flush(struct conn *c);
static void feed(struct conn *c, uint8_t *p, size_t n);
static void setup_next(struct conn *c);

static void set_interest(struct conn *c, uint32_t ev)
{
    if (ev == c->events)
        return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    int op = c->events ? (ev ? EPOLL_CTL_MOD : EPOLL_CTL_DEL) : EPOLL_CTL_ADD;
    if (op == EPOLL_CTL_ADD && !ev)
        return;
    if (epoll_ctl(epfd, op, c->fd, &e) < 0)
        fatal("epoll_ctl: %s", strerror(errno));
    c->events = ev;
}

static int pending_out(const struct conn *c)
{
    return c->next_seq > c->send_seq || c->ctrl_len > c->ctrl_off ||
           c->stage_off < c->stage_len;
}

static void update_run_interest(struct conn *c)
{
    uint32_t ev = EPOLLIN;
    if (c->want_out || c->rd_wants_wr)
        ev |= EPOLLOUT;
    set_interest(c, ev);
}

/* A failure on a connection. Before any connection was ever set up, or in
 * ping-pong/hold setup, it is fatal; in the run it is counted. */
static void conn_fail(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void conn_fail(struct conn *c, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    int in_setup = c->st < ST_RUN;
    if (phase == PH_SETUP || (in_setup && (cfg.mode != MODE_CONNRATE || !ever_ready)))
        fatal("connection %d (%s): %s", c->idx, state_name[c->st], msg);
    if (phase == PH_DONE)
        return;
    total_errors++;
    if (errors_printed < 10 && !cfg.quiet) {
        fprintf(stderr, "loadgen: connection %d (%s): %s\n", c->idx, state_name[c->st], msg);
        if (++errors_printed == 10)
            fprintf(stderr, "loadgen: (further errors not shown)\n");
    }
    int was_setting_up = in_setup;
    conn_close(c);
    if (was_setting_up)
        n_setting_up--;
    if (cfg.mode == MODE_CONNRATE && phase != PH_DONE && !c->finished) {
        c->st = ST_RETRY;
        c->keep_t_start = 0;
        c->retry_at = loop_now + 1000000;
        n_retry_pending++;
    } else {
        c->st = ST_DEAD;
        n_alive--;
    }
}

/* ------------------------------------------------------------------------ */
/* raw I/O (plain or TLS)                                                    */

static ssize_t cread(struct conn *c, void *buf, size_t len)
{
    if (!c->ssl) {
        for (;;) {
            ssize_t n = read(c->fd, buf, len);
            if (n < 0 && errno == EINTR)
                continue;
            return n;
        }
    }
    c->rd_wants_wr = 0;
    int r = SSL_read(c->ssl, buf, len > INT32_MAX ? INT32_MAX : (int)len);
    if (r > 0)
        return r;
    int e = SSL_get_error(c->ssl, r);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_WANT_WRITE:
        c->rd_wants_wr = 1;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN:
        return 0;
    case SSL_ERROR_SYSCALL:
        if (!errno) {
            ERR_clear_error();
            return 0;
        }
        return -1;
    default:
        errno = EPROTO;
        return -1;
    }
}

static ssize_t cwrite(struct conn *c, const void *buf, size_t len)
{
    if (!c->ssl) {
        for (;;) {
            ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR)
                continue;
            return n;
        }
    }
    int r = SSL_write(c->ssl, buf, len > INT32_MAX ? INT32_MAX : (int)len);
    if (r > 0)
        return r;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
        errno = EAGAIN;
        return -1;
    }
    if (e != SSL_ERROR_SYSCALL || !errno)
        errno = EPROTO;
    return -1;
}

static const char *io_err(struct conn *c)
{
    if (c->ssl && errno == EPROTO)
        return ssl_errstr();
    return strerror(errno);
}

/* ------------------------------------------------------------------------ */
/* connection lifecycle                                                      */

static void conn_reset_state(struct conn *c)
{
    c->fd = -1;
    c->events = 0;
    c->want_out = c->rd_wants_wr = 0;
    free(c->sbuf);
    c->sbuf = NULL;
    c->slen = c->soff = 0;
    free(c->hbuf);
    c->hbuf = NULL;
    c->hlen = 0;
    c->hsr_len = 0;
    c->send_seq = c->next_seq = 0;
    c->send_off = 0;
    c->ctrl_len = c->ctrl_off = 0;
    c->gen_valid = 0;
    c->stage_len = c->stage_off = 0;
    c->recv_seq = 0;
    c->outstanding = 0;
    c->hdr_got = 0;
    c->msg_len = c->msg_off = 0;
    c->in_msg = c->msg_bad = 0;
    c->expect = NULL;
    c->fh_got = 0;
    c->fh_need = 2;
    c->fpay_left = 0;
    c->in_frame = 0;
    c->ws_in_data_msg = 0;
    c->cin_len = 0;
    c->measure_from_seq = 0;
}

static void conn_close(struct conn *c)
{
    if (c->fd >= 0) {
        if (c->events)
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        if (c->ssl) {
            if (c->st == ST_RUN)
                SSL_shutdown(c->ssl); /* best effort close_notify */
            SSL_free(c->ssl);
            c->ssl = NULL;
            ERR_clear_error();
        }
        if (cfg.mode == MODE_CONNRATE && target_family != AF_UNIX && !cfg.graceful_close) {
            /* Abortive close: avoids running out of ports to TIME_WAIT. */
            struct linger lg = {1, 0};
            setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        }
        close(c->fd);
    }
    conn_reset_state(c);
}

static void conn_start(struct conn *c)
{
    conn_reset_state(c);
    c->last_progress = loop_now;
    if (!(c->st == ST_RETRY && c->keep_t_start))
        c->t_start = now_ns();
    c->keep_t_start = 0;
    c->fd = socket(target_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        if (errno == EMFILE || errno == ENFILE)
            fatal("socket: %s (raise ulimit -n)", strerror(errno));
        fatal("socket: %s", strerror(errno));
    }
    if (target_family != AF_UNIX) {
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    c->st = ST_CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&target_addr, target_len) == 0) {
        setup_next(c);
        return;
    }
    if (errno == EINPROGRESS) {
        set_interest(c, EPOLLOUT);
        return;
    }
    if (errno == EAGAIN || errno == EADDRNOTAVAIL || errno == EINTR) {
        /* unix listen backlog full / out of local ports: retry shortly */
        close(c->fd);
        c->fd = -1;
        c->st = ST_RETRY;
        c->keep_t_start = 1; /* the wait is part of this attempt */
        if (c->retry_delay_ms < 1)
            c->retry_delay_ms = 1;
        else if (c->retry_delay_ms < 64)
            c->retry_delay_ms *= 2;
        c->retry_at = loop_now + (uint64_t)c->retry_delay_ms * 1000000ull;
        n_retry_pending++;
        return;
    }
    int err = errno;
    if (cfg.mode == MODE_CONNRATE && ever_ready) {
        conn_fail(c, "connect: %s", strerror(err));
        return;
    }
    if (cfg.unix_path)
        fatal("connect to unix %s: %s", cfg.unix_path, strerror(err));
    fatal("connect to %s: %s", cfg.tcp_spec, strerror(err));
}

static void setup_send(struct conn *c, char *buf, size_t len, enum state st)
{
    free(c->sbuf);
    c->sbuf = buf;
    c->slen = len;
    c->soff = 0;
    c->st = st;
    c->last_progress = loop_now;
    while (c->soff < c->slen) {
        ssize_t n = cwrite(c, c->sbuf + c->soff, c->slen - c->soff);
        if (n < 0) {
            if (errno == EAGAIN) {
                set_interest(c, EPOLLOUT | EPOLLIN);
                return;
            }
            conn_fail(c, "write: %s", io_err(c));
            return;
        }
        c->soff += (size_t)n;
    }
    free(c->sbuf);
    c->sbuf = NULL;
    c->st = st == ST_WS_SEND ? ST_WS_RECV : ST_HS_RECV;
    set_interest(c, EPOLLIN);
    /* TLS may already hold the reply bytes */
    if (c->ssl && SSL_has_pending(c->ssl)) {
        ssize_t n = cread(c, gbuf, sizeof(gbuf));
        if (n > 0)
            feed(c, gbuf, (size_t)n);
    }
}

static void start_handshake_name(struct conn *c)
{
    size_t nl = strlen(cfg.handshake);
    if (cfg.ws_path) {
        char *b = xmalloc(nl + 14);
        size_t h = ws_header((uint8_t *)b, nl, 2, ws_mask_key);
        memcpy(b + h, cfg.handshake, nl);
        ws_mask((uint8_t *)b + h, nl, ws_mask_key);
        setup_send(c, b, h + nl, ST_HS_SEND);
    } else {
        char *b = xmalloc(nl);
        memcpy(b, cfg.handshake, nl);
        setup_send(c, b, nl, ST_HS_SEND);
    }
}

static void start_ws(struct conn *c)
{
    uint8_t raw[16];
    RAND_bytes(raw, sizeof(raw));
    char key[32];
    EVP_EncodeBlock((unsigned char *)key, raw, 16);
    char cat[96];
    snprintf(cat, sizeof(cat), "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    unsigned char dig[SHA_DIGEST_LENGTH];
    SHA1((unsigned char *)cat, strlen(cat), dig);
    EVP_EncodeBlock((unsigned char *)c->ws_accept, dig, SHA_DIGEST_LENGTH);
    char hostport[300];
    if (cfg.unix_path)
        snprintf(hostport, sizeof(hostport), "localhost");
    else if (strchr(cfg.host, ':'))
        snprintf(hostport, sizeof(hostport), "[%s]:%s", cfg.host, cfg.port);
    else
        snprintf(hostport, sizeof(hostport), "%s:%s", cfg.host, cfg.port);
    size_t cap = strlen(cfg.ws_path) + 512;
    char *req = xmalloc(cap);
    int n = snprintf(req, cap,
                     "GET %s HTTP/1.1\r\n"
                     "Host: %s\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "\r\n",
                     cfg.ws_path, hostport, key);
    setup_send(c, req, (size_t)n, ST_WS_SEND);
}

/* Called after connect, after TLS, after WS: go to the next setup step. */
static void setup_next(struct conn *c)
{
    c->last_progress = loop_now;
    switch (c->st) {
    case ST_CONNECTING: {
        int err = 0;
        socklen_t l = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            if (cfg.mode == MODE_CONNRATE && ever_ready) {
                conn_fail(c, "connect: %s", strerror(err));
                return;
            }
            if (cfg.unix_path)
                fatal("connect to unix %s: %s", cfg.unix_path, strerror(err));
            fatal("connect to %s: %s", cfg.tcp_spec, strerror(err));
        }
        if (cfg.tls) {
            c->ssl = SSL_new(ssl_ctx);
            if (!c->ssl)
                fatal("SSL_new: %s", ssl_errstr());
            SSL_set_fd(c->ssl, c->fd);
            const char *sni = cfg.sni;
            struct in6_addr tmp;
            if (!sni && inet_pton(AF_INET, cfg.host, &tmp) != 1 &&
                inet_pton(AF_INET6, cfg.host, &tmp) != 1)
                sni = cfg.host;
            if (sni)
                SSL_set_tlsext_host_name(c->ssl, sni);
            if (cfg.ca) {
                if (cfg.sni || sni)
                    SSL_set1_host(c->ssl, sni);
                else
                    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), cfg.host);
            }
            if (cfg.mode == MODE_HOLD)
                SSL_set_mode(c->ssl, SSL_MODE_RELEASE_BUFFERS);
            c->st = ST_TLS;
            set_interest(c, EPOLLOUT | EPOLLIN);
            goto tls_step;
        }
        goto after_tls;
    }
    case ST_TLS:
    tls_step: {
        int r = SSL_connect(c->ssl);
        if (r == 1)
            goto after_tls;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) {
            set_interest(c, EPOLLIN);
            return;
        }
        if (e == SSL_ERROR_WANT_WRITE) {
            set_interest(c, EPOLLOUT);
            return;
        }
        if (e == SSL_ERROR_SYSCALL && !ERR_peek_error())
            conn_fail(c, "TLS handshake: %s",
                      errno ? strerror(errno) : "connection closed by peer");
        else
            conn_fail(c, "TLS handshake failed: %s", ssl_errstr());
        return;
    }
    after_tls:
        if (cfg.ws_path) {
            start_ws(c);
            return;
        }
        /* fall through */
    case ST_WS_RECV:
        if (cfg.handshake) {
            start_handshake_name(c);
            return;
        }
        conn_ready(c);
        return;
    default:
        fatal("internal: setup_next in state %s", state_name[c->st]);
    }
}

/* ------------------------------------------------------------------------ */
/* sending                                                                   */

static inline const uint8_t *pat_payload(struct conn *c, uint64_t seq)
{
    return c->pat + (seq * 2749 + (uint64_t)c->idx * 131) % PAT_SPAN;
}

/* Adds message seq, from byte off of its frame, to iov. Returns 0 if it
 * cannot (a generated ws frame other than the head one). */
static int add_msg_iov(struct conn *c, uint64_t seq, size_t off, struct iovec *iov, int *cnt,
                       int max)
{
    if (!cfg.verify) {
        if (*cnt >= max)
            return 0;
        iov[*cnt].iov_base = tmpl + off;
        iov[*cnt].iov_len = frame_len - off;
        (*cnt)++;
        return 1;
    }
    if (cfg.ws_path) {
        if (seq != c->send_seq || *cnt >= max)
            return 0;
        if (!c->gen_valid || c->gen_seq != seq) {
            memcpy(c->genbuf, tmpl, frame_hdr_len);
            memcpy(c->genbuf + frame_hdr_len, pat_payload(c, seq), cfg.size);
            ws_mask(c->genbuf + frame_hdr_len, cfg.size, ws_mask_key);
            c->gen_seq = seq;
            c->gen_valid = 1;
        }
        iov[*cnt].iov_base = c->genbuf + off;
        iov[*cnt].iov_len = frame_len - off;
        (*cnt)++;
        return 1;
    }
    if (*cnt + 2 > max)
        return 0;
    const uint8_t *pl = pat_payload(c, seq);
    if (off < frame_hdr_len) {
        iov[*cnt].iov_base = tmpl + off;
        iov[*cnt].iov_len = frame_hdr_len - off;
        (*cnt)++;
        off = frame_hdr_len;
    }
    if (cfg.size) {
        iov[*cnt].iov_base = (void *)(pl + (off - frame_hdr_len));
        iov[*cnt].iov_len = frame_len - off;
        (*cnt)++;
    }
    return 1;
}

static void queue_msg(struct conn *c)
{
    uint64_t seq = c->next_seq++;
    c->sent_at[seq % ring_len] = now_ns();
    c->outstanding++;
}

static int build_iov(struct conn *c, struct iovec *iov, int max)
{
    int cnt = 0;
    if (c->ctrl_len > c->ctrl_off && c->send_off == 0) {
        iov[cnt].iov_base = c->ctrl + c->ctrl_off;
        iov[cnt].iov_len = c->ctrl_len - c->ctrl_off;
        cnt++;
    }
    for (uint64_t s = c->send_seq; s < c->next_seq; s++) {
        if (!add_msg_iov(c, s, s == c->send_seq ? c->send_off : 0, iov, &cnt, max))
            break;
    }
    return cnt;
}

static void advance(struct conn *c, size_t n)
{
    if (c->ctrl_len > c->ctrl_off && c->send_off == 0) {
        size_t t = c->ctrl_len - c->ctrl_off;
        if (t > n)
            t = n;
        c->ctrl_off += t;
        n -= t;
        if (c->ctrl_off == c->ctrl_len)
            c->ctrl_len = c->ctrl_off = 0;
    }
    while (n > 0) {
        size_t rem = frame_len - c->send_off;
        if (n >= rem) {
            n -= rem;
            c->send_off = 0;
            c->send_seq++;
        } else {
            c->send_off += n;
            n = 0;
        }
    }
}

static void conn_flush(struct conn *c)
{
    struct iovec iov[64];
    if (!c->ssl) {
        while (c->next_seq > c->send_seq || c->ctrl_len > c->ctrl_off) {
            int cnt = build_iov(c, iov, 64);
            ssize_t n = writev(c->fd, iov, cnt);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN) {
                    c->want_out = 1;
                    update_run_interest(c);
                    return;
                }
                conn_fail(c, "write: %s", strerror(errno));
                return;
            }
            advance(c, (size_t)n);
        }
    } else {
        for (;;) {
            if (c->stage_off >= c->stage_len) {
                c->stage_off = c->stage_len = 0;
                if (!(c->next_seq > c->send_seq || c->ctrl_len > c->ctrl_off))
                    break;
                if (!c->stage)
                    c->stage = xmalloc(c->stage_cap);
                int cnt = build_iov(c, iov, 64);
                size_t tot = 0;
                for (int i = 0; i < cnt && tot < c->stage_cap; i++) {
                    size_t t = iov[i].iov_len;
                    if (t > c->stage_cap - tot)
                        t = c->stage_cap - tot;
                    memcpy(c->stage + tot, iov[i].iov_base, t);
                    tot += t;
                }
                advance(c, tot);
                c->stage_len = tot;
            }
            ssize_t n = cwrite(c, c->stage + c->stage_off, c->stage_len - c->stage_off);
            if (n < 0) {
                if (errno == EAGAIN) {
                    c->want_out = 1;
                    update_run_interest(c);
                    return;
                }
                conn_fail(c, "TLS write: %s", io_err(c));
                return;
            }
            c->stage_off += (size_t)n;
        }
        if (cfg.mode == MODE_HOLD && c->stage) {
            free(c->stage);
            c->stage = NULL;
        }
    }
    if (c->want_out) {
        c->want_out = 0;
        update_run_interest(c);
    }
}

/* ------------------------------------------------------------------------ */
/* receiving                                                                 */

static int should_send(struct conn *c)
{
    if (cfg.mode != MODE_PINGPONG)
        return 0;
    if (phase != PH_WARMUP && phase != PH_MEASURE)
        return 0;
    if (cfg.count && phase == PH_MEASURE && c->next_seq - c->measure_from_seq >= cfg.count)
        return 0;
    return 1;
}

static void enter_done(void);

static void begin_message(struct conn *c, uint64_t len)
{
    c->in_msg = 1;
    c->msg_len = len;
    c->msg_off = 0;
    c->msg_bad = 0;
    if (c->st == ST_HS_RECV) {
        c->hsr_len = 0;
        return;
    }
    if (cfg.verify)
        c->expect = pat_payload(c, c->recv_seq);
}

static void on_payload(struct conn *c, const uint8_t *p, size_t n)
{
    if (c->st == ST_HS_RECV) {
        for (size_t i = 0; i < n && c->hsr_len < sizeof(c->hsr) - 1; i++)
            c->hsr[c->hsr_len++] = (char)p[i];
        c->msg_off += n;
        return;
    }
    if (cfg.verify && !c->msg_bad) {
        if (c->msg_off + n > cfg.size || memcmp(p, c->expect + c->msg_off, n) != 0)
            c->msg_bad = 1;
    }
    c->msg_off += n;
}

static void handshake_reply_done(struct conn *c)
{
    c->hsr[c->hsr_len] = 0;
    if (c->hsr_len != 2 || memcmp(c->hsr, "ok", 2) != 0) {
        char shown[64];
        size_t j = 0;
        for (size_t i = 0; i < c->hsr_len && j + 5 < sizeof(shown); i++) {
            unsigned char ch = (unsigned char)c->hsr[i];
            if (isprint(ch))
                shown[j++] = (char)ch;
            else
                j += (size_t)snprintf(shown + j, sizeof(shown) - j, "\\x%02x", ch);
        }
        shown[j] = 0;
        conn_fail(c, "handshake '%s' refused: server answered \"%s\" instead of \"ok\"",
                  cfg.handshake, shown);
        return;
    }
    conn_ready(c);
}

/* Returns 0 if the connection left ST_RUN (closed, restarted). */
static int end_message(struct conn *c)
{
    c->in_msg = 0;
    if (c->st == ST_HS_RECV) {
        handshake_reply_done(c);
        return c->st == ST_RUN;
    }
    if (c->outstanding == 0) {
        conn_fail(c, "unexpected message from server (%" PRIu64 " bytes)", c->msg_off);
        return 0;
    }
    uint64_t t = now_ns();
    uint64_t seq = c->recv_seq++;
    c->outstanding--;
    c->last_progress = loop_now;
    if (c->msg_off != cfg.size || c->msg_bad) {
        total_mismatches++;
        if (total_mismatches <= 5 && !cfg.quiet)
            fprintf(stderr,
                    "loadgen: connection %d message %" PRIu64 ": %s (%" PRIu64
                    " bytes, expected %" PRIu64 ")\n",
                    c->idx, seq, c->msg_bad ? "payload mismatch" : "length mismatch",
                    c->msg_off, cfg.size);
    }

    if (cfg.mode == MODE_PINGPONG) {
        int counted = 0;
        if (phase == PH_MEASURE) {
            if (cfg.count)
                counted = seq >= c->measure_from_seq;
            else
                counted = 1;
        }
        if (counted) {
            hist_add(&lat, t - c->sent_at[seq % ring_len]);
            c->measured++;
            total_completed_measured++;
            if (cfg.count && c->measured == cfg.count && !c->finished) {
                c->finished = 1;
                if (++n_finished >= n_alive) {
                    t_measure_end = t;
                    enter_done();
                    return 0;
                }
            }
        }
        if (should_send(c))
            queue_msg(c);
        return 1;
    }

    if (cfg.mode == MODE_HOLD) {
        hist_add(&lat, t - c->t_start);
        if (!c->held) {
            c->held = 1;
            n_held++;
        }
        return 1;
    }

    /* connect-rate: cycle complete */
    last_cycle_done = loop_now;
    if (phase == PH_MEASURE && c->t_start >= t_measure_start) {
        hist_add(&lat, t - c->t_start);
        c->measured++;
        total_completed_measured++;
    }
    conn_close(c);
    if (cfg.count && c->measured >= cfg.count) {
        c->finished = 1;
        c->st = ST_DEAD;
        if (++n_finished >= nconns) {
            t_measure_end = t;
            enter_done();
        }
        return 0;
    }
    if (phase == PH_WARMUP || phase == PH_MEASURE) {
        c->st = ST_FREE;
        conn_start(c);
    } else {
        c->st = ST_DEAD;
    }
    return 0;
}

/* LibIPC stream: u32 BE length + payload. */
static void ipc_feed(struct conn *c, uint8_t *p, size_t n)
{
    uint8_t *end = p + n;
    while (p < end) {
        if (c->hdr_got < 4) {
            while (c->hdr_got < 4 && p < end)
                c->hdr[c->hdr_got++] = *p++;
            if (c->hdr_got < 4)
                return;
            uint64_t len = ((uint64_t)c->hdr[0] << 24) | ((uint64_t)c->hdr[1] << 16) |
                           ((uint64_t)c->hdr[2] << 8) | c->hdr[3];
            begin_message(c, len);
            if (len == 0) {
                c->hdr_got = 0;
                if (!end_message(c))
                    return;
            }
            continue;
        }
        size_t k = (size_t)(end - p);
        if (k > c->msg_len - c->msg_off)
            k = (size_t)(c->msg_len - c->msg_off);
        on_payload(c, p, k);
        p += k;
        if (c->msg_off == c->msg_len) {
            c->hdr_got = 0;
            if (!end_message(c))
                return;
        }
    }
}

static void queue_pong(struct conn *c, const uint8_t *pl, size_t n)
{
    if (c->ctrl_off > 0)
        return; /* a control frame is being written: drop this pong */
    size_t h = ws_header(c->ctrl, n, 10, ws_mask_key);
    memcpy(c->ctrl + h, pl, n);
    ws_mask(c->ctrl + h, n, ws_mask_key);
    c->ctrl_len = h + n;
    c->ctrl_off = 0;
}

/* WebSocket frames from the server. Returns 0 if the connection was closed. */
static int ws_data(struct conn *c, uint8_t *p, size_t n, int fin_at_end)
{
    if (!cfg.ws_stream || c->st == ST_HS_RECV) {
        if (!c->in_msg)
            begin_message(c, 0);
        on_payload(c, p, n);
        if (fin_at_end)
            return end_message(c);
        return 1;
    }
    if (cfg.ws_ipc) {
        ipc_feed(c, p, n);
        return c->st == ST_RUN;
    }
    /* --ws-stream: payload bytes form a stream cut into --size replies */
    while (n > 0) {
        if (!c->in_msg)
            begin_message(c, cfg.size);
        size_t k = n;
        if (k > cfg.size - c->msg_off)
            k = (size_t)(cfg.size - c->msg_off);
        on_payload(c, p, k);
        p += k;
        n -= k;
        if (c->msg_off == cfg.size && !end_message(c))
            return 0;
    }
    return 1;
}

static void ws_feed(struct conn *c, uint8_t *p, size_t n)
{
    uint8_t *end = p + n;
    while (p < end) {
        if (!c->in_frame) {
            while (c->fh_got < c->fh_need && p < end) {
                c->fh[c->fh_got++] = *p++;
                if (c->fh_got == 2) {
                    int l7 = c->fh[1] & 0x7f;
                    c->fh_need = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) +
                                 ((c->fh[1] & 0x80) ? 4 : 0);
                }
            }
            if (c->fh_got < c->fh_need)
                return;
            c->ffin = (c->fh[0] & 0x80) != 0;
            c->fop = c->fh[0] & 0x0f;
            c->fmasked = (c->fh[1] & 0x80) != 0;
            int l7 = c->fh[1] & 0x7f;
            int pos = 2;
            uint64_t len = (uint64_t)l7;
            if (l7 == 126) {
                len = ((uint64_t)c->fh[2] << 8) | c->fh[3];
                pos = 4;
            } else if (l7 == 127) {
                len = 0;
                for (int i = 0; i < 8; i++)
                    len = (len << 8) | c->fh[2 + i];
                pos = 10;
            }
            if (c->fmasked)
                memcpy(c->fmask, c->fh + pos, 4);
            c->fmask_pos = 0;
            c->fpay_left = len;
            c->fh_got = 0;
            c->fh_need = 2;
            c->in_frame = 1;
            c->cin_len = 0;
            if (c->fop >= 8) {
                if (len > 125 || !c->ffin) {
                    conn_fail(c, "bad WebSocket control frame");
                    return;
                }
            } else if (c->fop == 0) {
                if (!c->ws_in_data_msg) {
                    conn_fail(c, "WebSocket continuation frame without a message");
                    return;
                }
            } else if (c->fop == 1 || c->fop == 2) {
                if (c->ws_in_data_msg) {
                    conn_fail(c, "WebSocket data frame inside a fragmented message");
                    return;
                }
                c->ws_in_data_msg = 1;
                if (!cfg.ws_stream || c->st == ST_HS_RECV)
                    begin_message(c, 0);
            } else {
                conn_fail(c, "WebSocket frame with reserved opcode %d", c->fop);
                return;
            }
        }
        /* frame payload (possibly empty) */
        size_t k = (size_t)(end - p);
        if (k > c->fpay_left)
            k = (size_t)c->fpay_left;
        if (c->fmasked && k) {
            for (size_t i = 0; i < k; i++)
                p[i] ^= c->fmask[(c->fmask_pos + i) & 3];
            c->fmask_pos += k;
        }
        c->fpay_left -= k;
        int frame_done = c->fpay_left == 0;
        if (c->fop >= 8) {
            memcpy(c->cin + c->cin_len, p, k);
            c->cin_len += k;
            p += k;
            if (!frame_done)
                continue;
            c->in_frame = 0;
            if (c->fop == 9) {
                queue_pong(c, c->cin, c->cin_len);
            } else if (c->fop == 8) {
                int code = c->cin_len >= 2 ? (c->cin[0] << 8 | c->cin[1]) : 0;
                conn_fail(c, "server sent WebSocket close (code %d)", code);
                return;
            }
            continue;
        }
        int msg_end = frame_done && c->ffin;
        if (frame_done) {
            c->in_frame = 0;
            if (c->ffin)
                c->ws_in_data_msg = 0;
        }
        if (k || msg_end) {
            if (!ws_data(c, p, k, msg_end))
                return;
        }
        p += k;
        if (c->st != ST_RUN && c->st != ST_HS_RECV)
            return;
    }
}

static void http_feed(struct conn *c, uint8_t *p, size_t n)
{
    if (!c->hbuf)
        c->hbuf = xmalloc(8192);
    size_t room = 8191 - c->hlen;
    size_t take = n < room ? n : room;
    memcpy(c->hbuf + c->hlen, p, take);
    size_t old = c->hlen;
    c->hlen += take;
    c->hbuf[c->hlen] = 0;
    char *eoh = strstr(c->hbuf, "\r\n\r\n");
    if (!eoh) {
        if (c->hlen >= 8191)
            conn_fail(c, "WebSocket handshake: response headers too long");
        return;
    }
    size_t hdr_end = (size_t)(eoh - c->hbuf) + 4;
    size_t used = hdr_end - old; /* bytes of p that belong to the headers */
    char *eol = strstr(c->hbuf, "\r\n");
    *eol = 0;
    int status = 0;
    if (sscanf(c->hbuf, "HTTP/%*s %d", &status) != 1 || status != 101) {
        conn_fail(c, "WebSocket handshake refused: \"%s\"", c->hbuf);
        return;
    }
    int ok = 0;
    for (char *line = eol + 2; line < eoh;) {
        char *nl = strstr(line, "\r\n");
        *nl = 0;
        if (strncasecmp(line, "sec-websocket-accept:", 21) == 0) {
            char *v = line + 21;
            while (*v == ' ' || *v == '\t')
                v++;
            char *ve = v + strlen(v);
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                *--ve = 0;
            ok = strcmp(v, c->ws_accept) == 0;
        }
        line = nl + 2;
    }
    if (!ok) {
        conn_fail(c, "WebSocket handshake: missing or wrong Sec-WebSocket-Accept");
        return;
    }
    free(c->hbuf);
    c->hbuf = NULL;
    c->hlen = 0;
    setup_next(c);
    if (used < n && (c->st == ST_RUN || c->st == ST_HS_RECV))
        feed(c, p + used, n - used);
}

static void feed(struct conn *c, uint8_t *p, size_t n)
{
    c->last_progress = loop_now;
    switch (c->st) {
    case ST_WS_RECV:
        http_feed(c, p, n);
        return;
    case ST_HS_RECV:
        if (cfg.ws_path) {
            ws_feed(c, p, n);
            return;
        }
        {
            size_t i = 0;
            while (i < n && c->hsr_len < 2)
                c->hsr[c->hsr_len++] = (char)p[i++];
            if (c->hsr_len < 2)
                return;
            handshake_reply_done(c);
            if (i < n && c->st == ST_RUN)
                feed(c, p + i, n - i);
        }
        return;
    case ST_RUN:
        if (cfg.ws_path)
            ws_feed(c, p, n);
        else
            ipc_feed(c, p, n);
        return;
    default:
        conn_fail(c, "unexpected data in state %s", state_name[c->st]);
    }
}

static void conn_read(struct conn *c)
{
    for (int iter = 0; iter < 8; iter++) {
        ssize_t n = cread(c, gbuf, sizeof(gbuf));
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            conn_fail(c, "read: %s", io_err(c));
            return;
        }
        if (n == 0) {
            conn_fail(c, "connection closed by server");
            return;
        }
        enum state before = c->st;
        feed(c, gbuf, (size_t)n);
        if (c->st != before && c->st != ST_RUN)
            return;
        if (c->st != ST_RUN && c->st != ST_HS_RECV && c->st != ST_WS_RECV)
            return;
        if (c->ssl) {
            if (!SSL_has_pending(c->ssl) && (size_t)n < sizeof(gbuf))
                break;
            iter = 0; /* must drain what OpenSSL holds: epoll cannot see it */
        } else if ((size_t)n < sizeof(gbuf)) {
            break;
        }
    }
    if (c->st == ST_RUN && c->rd_wants_wr)
        update_run_interest(c);
}

/* ------------------------------------------------------------------------ */

static void conn_ready(struct conn *c)
{
    c->st = ST_RUN;
    c->last_progress = loop_now;
    c->retry_delay_ms = 0;
    ever_ready = 1;
    update_run_interest(c);
    if (cfg.mode == MODE_CONNRATE || cfg.mode == MODE_HOLD) {
        if (cfg.mode == MODE_HOLD)
            n_setting_up--;
        queue_msg(c);
        conn_flush(c);
        return;
    }
    n_setting_up--;
    n_ready++;
    if (phase == PH_WARMUP || phase == PH_MEASURE) {
        /* (not reached: all connections are set up before the warmup) */
        for (long i = 0; i < cfg.inflight && should_send(c); i++)
            queue_msg(c);
        conn_flush(c);
    }
}

static void handle_event(struct conn *c, uint32_t ev)
{
    switch (c->st) {
    case ST_CONNECTING:
        setup_next(c);
        return;
    case ST_TLS:
        setup_next(c);
        return;
    case ST_WS_SEND:
    case ST_HS_SEND: {
        enum state st = c->st;
        char *b = c->sbuf;
        size_t off = c->soff, len = c->slen;
        c->sbuf = NULL;
        /* resume the pending write */
        char *rest = xmalloc(len - off);
        memcpy(rest, b + off, len - off);
        free(b);
        setup_send(c, rest, len - off, st);
        return;
    }
    case ST_WS_RECV:
    case ST_HS_RECV:
    case ST_RUN:
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP) || (c->rd_wants_wr && (ev & EPOLLOUT))) {
            conn_read(c);
            if (c->st != ST_RUN && c->st != ST_HS_RECV)
                return;
        }
        if (pending_out(c))
            conn_flush(c);
        return;
    default:
        return;
    }
}

/* ------------------------------------------------------------------------ */
/* phases                                                                    */

static void enter_measure(void)
{
    phase = PH_MEASURE;
    t_measure_start = now_ns();
    getrusage(RUSAGE_SELF, &ru_start);
    memset(&lat, 0, sizeof(lat));
    total_completed_measured = 0;
    for (long i = 0; i < nconns; i++) {
        conns[i].measured = 0;
        conns[i].measure_from_seq = conns[i].next_seq;
    }
    if (!cfg.count)
        t_end_deadline = t_measure_start + (uint64_t)(cfg.duration * 1e9);
}

static void enter_done(void)
{
    if (phase == PH_DONE)
        return;
    if (!t_measure_end)
        t_measure_end = now_ns();
    getrusage(RUSAGE_SELF, &ru_end);
    phase = PH_DONE;
}

static void start_traffic(void)
{
    t_ready = now_ns();
    phase = PH_WARMUP;
    if (cfg.warmup <= 0)
        enter_measure();
    for (long i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->st != ST_RUN)
            continue;
        for (long k = 0; k < cfg.inflight && should_send(c); k++)
            queue_msg(c);
        conn_flush(c);
    }
}

static double tv_s(const struct timeval *tv)
{
    return (double)tv->tv_sec + (double)tv->tv_usec / 1e6;
}

static void print_result(void)
{
    double secs = (double)(t_measure_end - t_measure_start) / 1e9;
    if (secs <= 0)
        secs = 1e-9;
    double cpu_u = tv_s(&ru_end.ru_utime) - tv_s(&ru_start.ru_utime);
    double cpu_s = tv_s(&ru_end.ru_stime) - tv_s(&ru_start.ru_stime);
    uint64_t pmin = UINT64_MAX, pmax = 0;
    for (long i = 0; i < nconns; i++) {
        if (conns[i].measured < pmin)
            pmin = conns[i].measured;
        if (conns[i].measured > pmax)
            pmax = conns[i].measured;
    }
    if (!nconns)
        pmin = 0;
    const char *transport = cfg.unix_path ? "unix" : "tcp";
    const char *mode = cfg.mode == MODE_PINGPONG  ? "pingpong"
                       : cfg.mode == MODE_CONNRATE ? "connect_rate"
                                                   : "hold";
    double rate = (double)total_completed_measured / secs;
    printf("{\"mode\":\"%s\",\"transport\":\"%s\",\"tls\":%s,\"ws\":%s,\"handshake\":%s,"
           "\"connections\":%ld,\"size\":%" PRIu64 ",\"inflight\":%ld,",
           mode, transport, cfg.tls ? "true" : "false", cfg.ws_path ? "true" : "false",
           cfg.handshake ? "true" : "false", nconns, cfg.size,
           cfg.mode == MODE_PINGPONG ? cfg.inflight : 1);
    if (cfg.mode == MODE_HOLD) {
        printf("\"held\":%ld,\"hold_seconds\":%.3f,\"setup_seconds\":%.6f,", n_alive,
               cfg.hold_seconds, (double)(t_ready - t_setup_start) / 1e9);
        secs = (double)(t_ready - t_setup_start) / 1e9;
        rate = secs > 0 ? (double)nconns / secs : 0;
        printf("\"rate\":%.1f,", rate);
    } else {
        printf("\"seconds\":%.6f,\"%s\":%" PRIu64 ",\"rate\":%.1f,", secs,
               cfg.mode == MODE_CONNRATE ? "connects" : "messages", total_completed_measured,
               rate);
        if (cfg.mode == MODE_PINGPONG)
            printf("\"mbps\":%.3f,", rate * (double)cfg.size / 1e6);
    }
    printf("\"p50_us\":%.2f,\"p90_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
           "\"min_us\":%.2f,\"max_us\":%.2f,\"mean_us\":%.2f,",
           hist_pct(&lat, 0.50) / 1e3, hist_pct(&lat, 0.90) / 1e3, hist_pct(&lat, 0.99) / 1e3,
           hist_pct(&lat, 0.999) / 1e3, (double)lat.min / 1e3, (double)lat.max / 1e3,
           lat.n ? lat.sum / (double)lat.n / 1e3 : 0.0);
    if (cfg.mode != MODE_HOLD)
        printf("\"per_conn_min\":%" PRIu64 ",\"per_conn_max\":%" PRIu64 ",", pmin, pmax);
    if (cfg.mode != MODE_HOLD)
        printf("\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f,\"cpu_pct\":%.1f,", cpu_u, cpu_s,
               (cpu_u + cpu_s) / secs * 100.0);
    printf("\"errors\":%" PRIu64 ",\"mismatches\":%" PRIu64 "}\n", total_errors,
           total_mismatches);
    fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* options                                                                   */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen (--unix PATH | --tcp HOST:PORT) [options]\n"
            "target / protocol:\n"
            "  --unix PATH            unix socket\n"
            "  --tcp HOST:PORT        TCP (IPv4, name, or [::1]:PORT)\n"
            "  --handshake NAME       send NAME raw, expect \"ok\" (LibIPC TCPd handshake)\n"
            "  --tls                  TLS over --tcp (no verification unless --ca)\n"
            "  --ca FILE              verify the server against this CA file\n"
            "  --sni NAME             TLS server name (also checked with --ca)\n"
            "  --ws PATH              WebSocket: GET PATH, one binary frame per message\n"
            "  --ws-stream            WebSocket replies are a byte stream (servers that\n"
            "                         do not keep message boundaries, e.g. websocketd)\n"
            "  --ws-ipc               each WebSocket message carries a whole LibIPC frame\n"
            "                         (u32 length + payload) and the replies are a stream\n"
            "                         of LibIPC frames: a byte bridge such as websockify\n"
            "                         in front of a LibIPC service\n"
            "load:\n"
            "  -c, --connections N    connections (default 1)\n"
            "  -s, --size BYTES       payload size (default 64)\n"
            "  -i, --inflight K       messages in flight per connection (default 1)\n"
            "  -d, --duration SEC     measured seconds (default 5)\n"
            "  -n, --count M          measured messages per connection (instead of -d)\n"
            "  -w, --warmup SEC       unmeasured warmup (default 0.5)\n"
            "      --verify           patterned payloads, check every echoed byte\n"
            "modes:\n"
            "      --connect-rate     connect/round trip/close loops on N connections\n"
            "      --graceful-close   (connect-rate, TCP) close normally, not with RST\n"
            "      --hold N           hold N idle connections (after one round trip)\n"
            "      --hold-seconds S   how long to hold (default 5); prints HOLDING N\n"
            "  -q, --quiet            fewer messages on stderr\n");
}

static double parse_double(const char *s, const char *opt)
{
    char *e;
    errno = 0;
    double v = strtod(s, &e);
    if (errno || *e || e == s || v < 0 || !isfinite(v))
        fatal("bad value for %s: '%s'", opt, s);
    return v;
}

static uint64_t parse_u64(const char *s, const char *opt)
{
    char *e;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 0);
    if (errno || e == s || s[0] == '-')
        fatal("bad value for %s: '%s'", opt, s);
    if (*e == 'k' || *e == 'K')
        v *= 1024, e++;
    else if (*e == 'm' || *e == 'M')
        v *= 1024 * 1024, e++;
    if (*e)
        fatal("bad value for %s: '%s'", opt, s);
    return v;
}

static void parse_target(void)
{
    if (!!cfg.unix_path == !!cfg.tcp_spec)
        fatal("give exactly one of --unix PATH or --tcp HOST:PORT (try --help)");
    memset(&target_addr, 0, sizeof(target_addr));
    if (cfg.unix_path) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&target_addr;
        if (strlen(cfg.unix_path) >= sizeof(sun->sun_path))
            fatal("unix path too long");
        sun->sun_family = AF_UNIX;
        strcpy(sun->sun_path, cfg.unix_path);
        target_len = sizeof(*sun);
        target_family = AF_UNIX;
        return;
    }
    const char *s = cfg.tcp_spec;
    const char *colon;
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (!rb || rb[1] != ':')
            fatal("bad --tcp '%s' (want [ADDR]:PORT)", s);
        size_t hl = (size_t)(rb - s - 1);
        if (hl >= sizeof(cfg.host))
            fatal("host too long");
        memcpy(cfg.host, s + 1, hl);
        cfg.host[hl] = 0;
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon || colon == s)
            fatal("bad --tcp '%s' (want HOST:PORT)", s);
        size_t hl = (size_t)(colon - s);
        if (hl >= sizeof(cfg.host))
            fatal("host too long");
        memcpy(cfg.host, s, hl);
        cfg.host[hl] = 0;
    }
    if (strlen(colon + 1) == 0 || strlen(colon + 1) >= sizeof(cfg.port))
        fatal("bad port in --tcp '%s'", s);
    strcpy(cfg.port, colon + 1);
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(cfg.host, cfg.port, &hints, &res);
    if (rc)
        fatal("resolve %s: %s", s, gai_strerror(rc));
    memcpy(&target_addr, res->ai_addr, res->ai_addrlen);
    target_len = res->ai_addrlen;
    target_family = res->ai_family;
    freeaddrinfo(res);
}

static void parse_args(int argc, char **argv)
{
    enum {
        O_UNIX = 256, O_TCP, O_HANDSHAKE, O_TLS, O_CA, O_SNI, O_WS, O_WS_STREAM, O_WS_IPC, O_VERIFY,
        O_CONNRATE, O_HOLD, O_HOLDSEC, O_GRACEFUL,
    };
    static const struct option opts[] = {
        {"unix", required_argument, 0, O_UNIX},
        {"tcp", required_argument, 0, O_TCP},
        {"handshake", required_argument, 0, O_HANDSHAKE},
        {"tls", no_argument, 0, O_TLS},
        {"ca", required_argument, 0, O_CA},
        {"sni", required_argument, 0, O_SNI},
        {"ws", required_argument, 0, O_WS},
        {"ws-stream", no_argument, 0, O_WS_STREAM},
        {"ws-ipc", no_argument, 0, O_WS_IPC},
        {"connections", required_argument, 0, 'c'},
        {"size", required_argument, 0, 's'},
        {"inflight", required_argument, 0, 'i'},
        {"duration", required_argument, 0, 'd'},
        {"count", required_argument, 0, 'n'},
        {"warmup", required_argument, 0, 'w'},
        {"verify", no_argument, 0, O_VERIFY},
        {"connect-rate", no_argument, 0, O_CONNRATE},
        {"graceful-close", no_argument, 0, O_GRACEFUL},
        {"hold", required_argument, 0, O_HOLD},
        {"hold-seconds", required_argument, 0, O_HOLDSEC},
        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int conn_given = 0, modes = 0;
    int o;
    while ((o = getopt_long(argc, argv, "c:s:i:d:n:w:qh", opts, NULL)) != -1) {
        switch (o) {
        case O_UNIX: cfg.unix_path = optarg; break;
        case O_TCP: cfg.tcp_spec = optarg; break;
        case O_HANDSHAKE: cfg.handshake = optarg; break;
        case O_TLS: cfg.tls = 1; break;
        case O_CA: cfg.ca = optarg; break;
        case O_SNI: cfg.sni = optarg; break;
        case O_WS: cfg.ws_path = optarg; break;
        case O_WS_STREAM: cfg.ws_stream = 1; break;
        case O_WS_IPC: cfg.ws_ipc = 1; break;
        case 'c': cfg.connections = (long)parse_u64(optarg, "--connections"); conn_given = 1; break;
        case 's': cfg.size = parse_u64(optarg, "--size"); break;
        case 'i': cfg.inflight = (long)parse_u64(optarg, "--inflight"); break;
        case 'd': cfg.duration = parse_double(optarg, "--duration"); break;
        case 'n': cfg.count = parse_u64(optarg, "--count"); break;
        case 'w': cfg.warmup = parse_double(optarg, "--warmup"); break;
        case O_VERIFY: cfg.verify = 1; break;
        case O_CONNRATE: cfg.mode = MODE_CONNRATE; modes++; break;
        case O_GRACEFUL: cfg.graceful_close = 1; break;
        case O_HOLD: cfg.hold = (long)parse_u64(optarg, "--hold"); cfg.mode = MODE_HOLD; modes++; break;
        case O_HOLDSEC: cfg.hold_seconds = parse_double(optarg, "--hold-seconds"); break;
        case 'q': cfg.quiet = 1; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc)
        fatal("unexpected argument '%s' (try --help)", argv[optind]);
    if (modes > 1)
        fatal("--connect-rate and --hold are exclusive");
    parse_target();
    if (cfg.tls && !cfg.tcp_spec)
        fatal("--tls needs --tcp");
    if ((cfg.ca || cfg.sni) && !cfg.tls)
        fatal("--ca/--sni need --tls");
    if (cfg.ws_stream && !cfg.ws_path)
        fatal("--ws-stream needs --ws");
    if (cfg.ws_ipc && !cfg.ws_path)
        fatal("--ws-ipc needs --ws");
    if (cfg.ws_ipc)
        cfg.ws_stream = 1; /* replies are a byte stream, cut by their LibIPC headers */
    if (cfg.ws_path && cfg.ws_path[0] != '/')
        fatal("--ws PATH must start with '/'");
    if (cfg.handshake && !cfg.handshake[0])
        fatal("--handshake NAME must not be empty");
    if (cfg.connections < 1)
        fatal("--connections must be >= 1");
    if (cfg.inflight < 1)
        fatal("--inflight must be >= 1");
    if (cfg.size > 0xFFFFFFFFull)
        fatal("--size must fit the u32 LibIPC header");
    if (cfg.ws_stream && cfg.size == 0)
        fatal("--ws-stream needs --size > 0");
    if (cfg.mode == MODE_PINGPONG && !cfg.count && cfg.duration <= 0)
        fatal("--duration must be > 0");
    if (cfg.mode == MODE_HOLD) {
        if (cfg.hold < 1)
            fatal("--hold N needs N >= 1");
        if (conn_given && cfg.connections != cfg.hold)
            fatal("--hold N sets the number of connections; do not also give --connections");
        cfg.connections = cfg.hold;
    }
    if (cfg.mode != MODE_PINGPONG)
        cfg.inflight = 1;
}

/* ------------------------------------------------------------------------ */

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)cfg.connections + 16 > rl.rlim_cur)
        fatal("%ld connections need more descriptors than RLIMIT_NOFILE (%llu)",
              cfg.connections, (unsigned long long)rl.rlim_cur);
}

static void init_tls(void)
{
    OPENSSL_init_ssl(0, NULL);
    ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (!ssl_ctx)
        fatal("SSL_CTX_new: %s", ssl_errstr());
    SSL_CTX_set_mode(ssl_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                  SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
    SSL_CTX_set_options(ssl_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
    if (cfg.ca) {
        if (SSL_CTX_load_verify_locations(ssl_ctx, cfg.ca, NULL) != 1)
            fatal("--ca %s: %s", cfg.ca, ssl_errstr());
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER, NULL);
    } else {
        SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, NULL);
    }
}

static void check_timeouts(void)
{
    /* connect-rate: failed attempts are retried, and every new attempt counts as
       progress for its connection; so also give up when no cycle at all completed
       for 10 s (e.g. the server went away), instead of retrying for ever. */
    if (cfg.mode == MODE_CONNRATE) {
        if (!last_cycle_done)
            last_cycle_done = loop_now;
        if (phase != PH_DONE && loop_now - last_cycle_done > PROGRESS_TIMEOUT_NS) {
            fprintf(stderr, "loadgen: timeout: no connect cycle completed for 10 s "
                            "(%llu errors)\n", (unsigned long long)total_errors);
            exit(3);
        }
    }
    for (long i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        int busy;
        switch (c->st) {
        case ST_RETRY:
        case ST_CONNECTING:
        case ST_TLS:
        case ST_WS_SEND:
        case ST_WS_RECV:
        case ST_HS_SEND:
        case ST_HS_RECV:
            busy = 1;
            break;
        case ST_RUN:
            busy = c->outstanding > 0 || pending_out(c);
            break;
        default:
            busy = 0;
        }
        if (busy && loop_now - c->last_progress > PROGRESS_TIMEOUT_NS) {
            if (c->st == ST_RUN)
                fprintf(stderr,
                        "loadgen: timeout: connection %d made no progress for 10 s "
                        "(%u replies outstanding)\n",
                        c->idx, c->outstanding);
            else
                fprintf(stderr,
                        "loadgen: timeout: connection %d stuck in %s for 10 s\n",
                        c->idx, state_name[c->st]);
            exit(3);
        }
    }
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    if (cfg.tls)
        init_tls();
    if (getrandom(ws_mask_key, 4, 0) != 4)
        memcpy(ws_mask_key, "\x5a\x3c\x96\xe1", 4);

    /* the frame template */
    uint8_t hdr[18]; /* WebSocket header (<= 14) + LibIPC header with --ws-ipc */
    if (cfg.ws_path && cfg.ws_ipc) {
        /* WebSocket header, then the LibIPC header as the first 4 payload
           bytes, masked with the key from its start (4 % 4 == 0, so the
           payload after it is masked as the code below expects) */
        frame_hdr_len = ws_header(hdr, cfg.size + 4, 2, ws_mask_key);
        for (int i = 0; i < 4; i++)
            hdr[frame_hdr_len + i] = (uint8_t)(cfg.size >> (24 - 8 * i)) ^ ws_mask_key[i];
        frame_hdr_len += 4;
    } else if (cfg.ws_path) {
        frame_hdr_len = ws_header(hdr, cfg.size, 2, ws_mask_key);
    } else {
        hdr[0] = (uint8_t)(cfg.size >> 24);
        hdr[1] = (uint8_t)(cfg.size >> 16);
        hdr[2] = (uint8_t)(cfg.size >> 8);
        hdr[3] = (uint8_t)cfg.size;
        frame_hdr_len = 4;
    }
    frame_len = frame_hdr_len + cfg.size;
    tmpl = xmalloc(frame_len);
    memcpy(tmpl, hdr, frame_hdr_len);
    for (uint64_t i = 0; i < cfg.size; i++)
        tmpl[frame_hdr_len + i] = (uint8_t)('a' + i % 26);
    if (cfg.ws_path)
        ws_mask(tmpl + frame_hdr_len, cfg.size, ws_mask_key);
    ring_len = (size_t)cfg.inflight;

    nconns = cfg.connections;
    n_alive = nconns;
    conns = xcalloc((size_t)nconns, sizeof(*conns));
    size_t stage_cap = frame_len * (size_t)cfg.inflight + 256;
    if (stage_cap < 4096)
        stage_cap = 4096;
    if (stage_cap > 65536)
        stage_cap = 65536;
    for (long i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->idx = (int)i;
        c->fd = -1;
        c->st = ST_FREE;
        c->fh_need = 2;
        c->sent_at = xcalloc(ring_len, sizeof(uint64_t));
        c->stage_cap = stage_cap;
        if (cfg.verify) {
            c->pat = xmalloc(cfg.size + PAT_SPAN);
            gen_payload(c->pat, cfg.size + PAT_SPAN, (uint64_t)i + 1);
            if (cfg.ws_path)
                c->genbuf = xmalloc(frame_len);
        }
    }

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        fatal("epoll_create1: %s", strerror(errno));

    loop_now = now_ns();
    t_setup_start = loop_now;
    uint64_t last_check = loop_now;
    if (cfg.mode == MODE_CONNRATE) {
        /* no separate setup: the connects are what is measured */
        phase = PH_WARMUP;
        t_ready = loop_now;
        if (cfg.warmup <= 0)
            enter_measure();
        else
            t_end_deadline = 0;
        for (long i = 0; i < nconns && phase != PH_DONE; i++) {
            conns[i].st = ST_FREE;
            conn_start(&conns[i]);
        }
    }

    int maxev = nconns < 1024 ? (int)nconns + 1 : 1024;
    struct epoll_event *evs = xcalloc((size_t)maxev, sizeof(*evs));
    uint64_t warm_end = 0;

    while (phase != PH_DONE) {
        loop_now = now_ns();

        /* phase control */
        if (phase == PH_SETUP) {
            while (n_setting_up < MAX_SETUP_CONCURRENCY && next_to_start < nconns) {
                struct conn *c = &conns[next_to_start++];
                n_setting_up++;
                conn_start(c);
            }
            if (cfg.mode == MODE_PINGPONG && n_ready == nconns) {
                start_traffic();
                warm_end = t_ready + (uint64_t)(cfg.warmup * 1e9);
                continue;
            }
            if (cfg.mode == MODE_HOLD && n_held == nconns) {
                t_ready = loop_now;
                phase = PH_HOLDING;
                t_hold_end = loop_now + (uint64_t)(cfg.hold_seconds * 1e9);
                printf("HOLDING %ld\n", nconns);
                fflush(stdout);
                continue;
            }
        } else if (phase == PH_WARMUP) {
            if (cfg.mode == MODE_CONNRATE && !warm_end)
                warm_end = t_ready + (uint64_t)(cfg.warmup * 1e9);
            if (loop_now >= warm_end) {
                enter_measure();
                continue;
            }
        } else if (phase == PH_MEASURE) {
            if (!cfg.count && loop_now >= t_end_deadline) {
                t_measure_end = loop_now;
                enter_done();
                break;
            }
        } else if (phase == PH_HOLDING) {
            if (loop_now >= t_hold_end) {
                enter_done();
                break;
            }
        }
        if (n_alive <= 0 || (phase == PH_MEASURE && cfg.count && n_finished >= n_alive &&
                             cfg.mode == MODE_PINGPONG)) {
            if (phase == PH_SETUP || phase == PH_WARMUP)
                fatal("all connections failed");
            enter_done();
            break;
        }

        /* retries */
        uint64_t next_retry = UINT64_MAX;
        if (n_retry_pending > 0) {
            for (long i = 0; i < nconns; i++) {
                struct conn *c = &conns[i];
                if (c->st != ST_RETRY)
                    continue;
                if (c->retry_at <= loop_now) {
                    n_retry_pending--;
                    conn_start(c);
                } else if (c->retry_at < next_retry) {
                    next_retry = c->retry_at;
                }
            }
        }

        if (loop_now - last_check >= 1000000000ull) {
            last_check = loop_now;
            check_timeouts();
        }

        /* how long may we sleep? */
        uint64_t deadline = last_check + 1000000000ull;
        if (next_retry < deadline)
            deadline = next_retry;
        if (phase == PH_WARMUP && warm_end && warm_end < deadline)
            deadline = warm_end;
        if (phase == PH_MEASURE && !cfg.count && t_end_deadline < deadline)
            deadline = t_end_deadline;
        if (phase == PH_HOLDING && t_hold_end < deadline)
            deadline = t_hold_end;
        int timeout_ms = 0;
        if (deadline > loop_now)
            timeout_ms = (int)((deadline - loop_now + 999999) / 1000000);

        int n = epoll_wait(epfd, evs, maxev, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fatal("epoll_wait: %s", strerror(errno));
        }
        loop_now = now_ns();
        for (int i = 0; i < n && phase != PH_DONE; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd < 0)
                continue;
            handle_event(c, evs[i].events);
        }
    }

    if (cfg.mode == MODE_HOLD && !t_measure_end)
        t_measure_end = now_ns();
    for (long i = 0; i < nconns; i++)
        if (conns[i].fd >= 0)
            conn_close(&conns[i]);
    free(evs);
    print_result();
    if (total_errors || total_mismatches) {
        fprintf(stderr, "loadgen: %" PRIu64 " errors, %" PRIu64 " mismatches\n", total_errors,
                total_mismatches);
        return 1;
    }
    return 0;
}
