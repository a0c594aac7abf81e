// Most shims are static inline functions in include/ctether.h. The ones that need glibc's GNU
// extensions live here, where _GNU_SOURCE can be defined without reaching Swift's view of glibc.
#define _GNU_SOURCE
#include <sys/socket.h>
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <spawn.h>
#include "ctether.h"

#ifdef __linux__
int tether_accept(int fd) {
    int c;
    do { c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); } while (c < 0 && errno == EINTR);
    return c;
}

void tether_set_thread_name(const char *name) { pthread_setname_np(pthread_self(), name); }

int tether_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int tether_spawn_actions_chdir(void *actions, const char *dir) {
    return posix_spawn_file_actions_addchdir_np((posix_spawn_file_actions_t *)actions, dir);
}

int tether_open_temp(const char *dir) {
    // O_TMPFILE: a file that never has a name (nothing to unlink, nothing left after a crash).
    int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0 || (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)) return fd;
    // A file system without O_TMPFILE: a named file, unlinked at once.
    char path[4096];
    if (snprintf(path, sizeof path, "%s/tether.XXXXXX", dir) >= (int)sizeof path) { errno = ENAMETOOLONG; return -1; }
    fd = mkostemp(path, O_CLOEXEC);
    if (fd >= 0) unlink(path);
    return fd;
}
#endif
