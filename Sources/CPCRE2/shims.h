#ifndef CPCRE2_SHIMS_H
#define CPCRE2_SHIMS_H
// PCRE2 for regex locations (Debian: libpcre2-dev), 8-bit code units, as nginx uses it.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#endif
