// The emulation provides everything of <cuda_runtime.h> the kernels use: see ../cuda_emulation.h.
#pragma once
#include "../cuda_emulation.h"
