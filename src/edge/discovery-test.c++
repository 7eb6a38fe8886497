#include <kj/test.h>
