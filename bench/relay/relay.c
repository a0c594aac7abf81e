// A measuring tool for bench/cpu.sh (FLOOR=1), not part of Tether: the least a keep-alive proxy
// can ask of the kernel per request, in two ways.
//
//   relay epoll PORT BACKEND-PORT   # edge-triggered epoll, one recv and one send per message, as Tether reads and writes
//   relay uring PORT BACKEND-PORT   # io_uring: the receives and sends of a pass submitted together
//
// Each client connection gets an upstream connection of its own, opened when the client's is
// accepted, and bytes are relayed both ways as they come, without parsing: with one request in
// flight per connection (wrk's keep-alive load) this is a proxy's traffic at its floor. One thread.
// Messages are assumed to fit one read and one send (12-byte answers); a short send ends the
// process with a message, so a figure is never made on a relay that lost bytes.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXFD 65536
#define BUF 16384

static int peer_of[MAXFD];
static char *buf_of[MAXFD];
// A descriptor's generation: raised when its pair is closed, so that an event or a completion
// for the closed pair is not taken for the one that reuses the number.
static uint32_t gen_of[MAXFD];
static int sending[MAXFD];   // io_uring: the length of the send under way from this descriptor
static int backend_port;

static void die(const char *what) {
    fprintf(stderr, "relay: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int listen_on(int port) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 4096) < 0) die("listen");
    return l;
}

// A blocking connect to the backend (once per client connection, outside the measured requests).
static int connect_backend(int nonblocking) {
    int u = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(backend_port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(u, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    int one = 1;
    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nonblocking && fcntl(u, F_SETFL, fcntl(u, F_GETFL) | O_NONBLOCK) < 0) die("fcntl");
    return u;
}

static void pair(int c, int u) {
    if (c >= MAXFD || u >= MAXFD) { fprintf(stderr, "relay: descriptor beyond %d\n", MAXFD); exit(1); }
    peer_of[c] = u;
    peer_of[u] = c;
    if (!buf_of[c]) buf_of[c] = malloc(BUF);
    if (!buf_of[u]) buf_of[u] = malloc(BUF);
}

static void unpair(int fd) {
    int p = peer_of[fd];
    gen_of[fd]++;
    gen_of[p]++;
    shutdown(fd, SHUT_RDWR);   // (io_uring: pending receives end)
    shutdown(p, SHUT_RDWR);
    close(fd);
    close(p);
}

static uint64_t token(int fd) { return (uint64_t)gen_of[fd] << 32 | (uint32_t)fd; }

// ---- epoll: one registration per descriptor, edge-triggered; recv once (a short read took all
// there was), send it on.
static void run_epoll(int l) {
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = token(l)};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    struct epoll_event events[512];
    for (;;) {
        int n = epoll_wait(ep, events, 512, -1);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < n; i++) {
            int fd = (int)(uint32_t)events[i].data.u64;
            if ((uint32_t)(events[i].data.u64 >> 32) != gen_of[fd]) continue;
            if (fd == l) {
                int c;
                while ((c = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    int u = connect_backend(1);
                    pair(c, u);
                    struct epoll_event e = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u64 = token(c)};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
                    e.data.u64 = token(u);
                    epoll_ctl(ep, EPOLL_CTL_ADD, u, &e);
                }
                continue;
            }
            if (!(events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) continue;
            ssize_t r = recv(fd, buf_of[fd], BUF, 0);
            if (r == 0 || (r < 0 && errno != EAGAIN)) { unpair(fd); continue; }
            if (r < 0) continue;
            ssize_t w = send(peer_of[fd], buf_of[fd], r, MSG_NOSIGNAL);
            if (w != r) { if (w < 0 && (errno == EPIPE || errno == ECONNRESET)) { unpair(fd); continue; } die("short send"); }
        }
    }
}

// ---- io_uring: a receive is always pending on each descriptor; when it completes, a send of
// what came goes to the peer, and when that completes, the receive is queued again. All that a
// pass queued goes to the kernel in the one io_uring_enter that also waits for the next completions.
enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3 };
// user_data: the operation (8 bits), the descriptor's generation (24 bits), the descriptor (32 bits).
static uint64_t data(int op, int fd) { return (uint64_t)op << 56 | (uint64_t)(gen_of[fd] & 0xFFFFFF) << 32 | (uint32_t)fd; }
static struct io_uring ring;

static struct io_uring_sqe *sqe(void) {
    struct io_uring_sqe *s = io_uring_get_sqe(&ring);
    if (!s) {
        io_uring_submit(&ring);
        s = io_uring_get_sqe(&ring);
        if (!s) { fprintf(stderr, "relay: submission queue full\n"); exit(1); }
    }
    return s;
}

static void queue(int op, int fd, int len) {
    struct io_uring_sqe *s = sqe();
    if (op == OP_RECV) io_uring_prep_recv(s, fd, buf_of[fd], BUF, 0);
    else io_uring_prep_send(s, peer_of[fd], buf_of[fd], len, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, data(op, fd));
}

static void queue_accept(int l) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_accept(s, l, NULL, NULL, 0);
    io_uring_sqe_set_data64(s, data(OP_ACCEPT, l));
}

static void run_uring(int l) {
    struct io_uring_params p = {0};
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (io_uring_queue_init_params(4096, &ring, &p) < 0) {
        memset(&p, 0, sizeof p);
        if (io_uring_queue_init_params(4096, &ring, &p) < 0) die("io_uring_queue_init");
    }
    queue_accept(l);
    for (;;) {
        int rc = io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR) { errno = -rc; die("io_uring_submit_and_wait"); }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            int op = (int)(cqe->user_data >> 56), fd = (int)(uint32_t)cqe->user_data, res = cqe->res;
            if (((cqe->user_data >> 32) & 0xFFFFFF) != (gen_of[fd] & 0xFFFFFF)) continue;   // a closed pair's
            if (op == OP_ACCEPT) {
                if (res >= 0) {
                    int one = 1;
                    setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    int u = connect_backend(0);
                    pair(res, u);
                    queue(OP_RECV, res, 0);
                    queue(OP_RECV, u, 0);
                }
                queue_accept(l);
            } else if (op == OP_RECV) {
                if (res <= 0) { if (res != -EAGAIN) unpair(fd); else queue(OP_RECV, fd, 0); continue; }
                sending[fd] = res;
                queue(OP_SEND, fd, res);
            } else {
                // the send of fd's bytes to its peer is done: fd may receive again
                if (res < 0) continue;   // the peer went; its receive ends the pair
                if (res != sending[fd]) { fprintf(stderr, "relay: short send\n"); exit(1); }
                queue(OP_RECV, fd, 0);
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: relay epoll|uring PORT BACKEND-PORT\n"); return 2; }
    backend_port = atoi(argv[3]);
    int l = listen_on(atoi(argv[2]));
    if (strcmp(argv[1], "epoll") == 0) run_epoll(l);
    else if (strcmp(argv[1], "uring") == 0) {
        int fl = fcntl(l, F_GETFL);
        fcntl(l, F_SETFL, fl & ~O_NONBLOCK);
        run_uring(l);
    } else { fprintf(stderr, "relay: epoll or uring\n"); return 2; }
    return 0;
}
