// The shims are static inline functions in include/ctether.h; SwiftPM needs one C file per target.
#include "ctether.h"
