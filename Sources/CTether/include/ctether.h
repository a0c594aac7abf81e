#ifndef CTETHER_H
#define CTETHER_H
// Small wrappers over glibc functions Swift's Glibc module does not export.
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

/// Gives free memory at the top and in the middle of every arena back to the system.
static inline int tether_malloc_trim(void) { return malloc_trim(0); }

#endif
