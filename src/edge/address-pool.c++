#include "address-pool.h"
