#ifndef CTETHER_H
#define CTETHER_H
// No _GNU_SOURCE here: this header is imported into Swift next to the SwiftGlibc module, and a
// feature macro changes how glibc's headers define fd_set and friends, which breaks a clean build
// ("__fds_bits ... not present in definition of 'fd_set' in module 'CTether'"). The two GNU
// functions (accept4, pthread_setname_np) are wrapped in shims.c, which defines it for itself.
// Small wrappers over glibc functions Swift's Glibc module does not export or cannot call safely.
#include <malloc.h>
#include <stddef.h>

/// Bytes malloc holds free in its arenas (not returned to the system), and in use.
static inline size_t tether_malloc_free_bytes(void) {
    struct mallinfo2 m = mallinfo2();
    return m.fordblks;
}

static inline size_t tether_malloc_used_bytes(void) {
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}

/// The size malloc gave the block at `p` (without its 8-byte chunk header).
static inline size_t tether_malloc_usable_size(void *p) { return malloc_usable_size(p); }

/// Gives free memory at the top and in the middle of every arena back to the system.
static inline int tether_malloc_trim(void) { return malloc_trim(0); }

#ifdef __linux__
// epoll, eventfd and accept4 for TetherIO. struct epoll_event is packed on x86-64, so Swift never
// touches it: events are read and written through these accessors.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <errno.h>
#include <stdint.h>

enum {
    TETHER_EPOLLIN = EPOLLIN, TETHER_EPOLLOUT = EPOLLOUT, TETHER_EPOLLRDHUP = EPOLLRDHUP,
    TETHER_EPOLLHUP = EPOLLHUP, TETHER_EPOLLERR = EPOLLERR, TETHER_EPOLLET = (int)EPOLLET,
};

static inline int tether_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

/// Registers fd for `events`, with `token` handed back with each of its events.
static inline int tether_epoll_add(int epfd, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev = { .events = events, .data = { .u64 = token } };
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

static inline int tether_epoll_modify(int epfd, int fd, uint32_t events, uint64_t token) {
    struct epoll_event ev = { .events = events, .data = { .u64 = token } };
    return epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}

static inline int tether_epoll_delete(int epfd, int fd) {
    struct epoll_event ev = { 0 };
    return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev);
}

/// An anonymous temp file in `dir`, open for reading and writing: created with O_TMPFILE, or
/// created and unlinked at once where the file system has no O_TMPFILE. -1 with errno on failure.
int tether_open_temp(const char *dir);

/// The size of one event in the buffer `tether_epoll_wait` fills.
static inline size_t tether_epoll_event_size(void) { return sizeof(struct epoll_event); }

/// Waits for events into `buffer` (room for `capacity` events), retrying on EINTR.
static inline int tether_epoll_wait(int epfd, void *buffer, int capacity, int timeout_ms) {
    int n;
    do { n = epoll_wait(epfd, (struct epoll_event *)buffer, capacity, timeout_ms); } while (n < 0 && errno == EINTR);
    return n;
}

static inline uint32_t tether_epoll_event_events(const void *buffer, int i) {
    return ((const struct epoll_event *)buffer)[i].events;
}

static inline uint64_t tether_epoll_event_token(const void *buffer, int i) {
    return ((const struct epoll_event *)buffer)[i].data.u64;
}

static inline int tether_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

/// A non-blocking, close-on-exec accepted socket, or -1 with errno (EINTR retried). In shims.c.
int tether_accept(int fd);

static inline int tether_errno(void) { return errno; }

/// Names the calling thread (15 bytes at most), as top and gdb show it. In shims.c.
void tether_set_thread_name(const char *name);
/// pipe2(O_CLOEXEC): both ends closed in any program spawned meanwhile (the tests' Spawn).
int tether_pipe_cloexec(int fds[2]);
/// posix_spawn_file_actions_addchdir_np, on a `posix_spawn_file_actions_t *`.
int tether_spawn_actions_chdir(void *actions, const char *dir);
#endif

#endif
