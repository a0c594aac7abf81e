// Most shims are static inline functions in include/ctether.h. The ones that need glibc's GNU
// extensions live here, where _GNU_SOURCE can be defined without reaching Swift's view of glibc.
#define _GNU_SOURCE
#include <sys/socket.h>
#include <errno.h>
#include <pthread.h>
#include "ctether.h"

#ifdef __linux__
int tether_accept(int fd) {
    int c;
    do { c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); } while (c < 0 && errno == EINTR);
    return c;
}

void tether_set_thread_name(const char *name) { pthread_setname_np(pthread_self(), name); }
#endif
