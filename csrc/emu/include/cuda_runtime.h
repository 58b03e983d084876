// SPDX-License-Identifier: Apache-2.0
// Host emulation (csrc/emu/): <cuda_runtime.h> of kernel sources compiled with the host compiler.
#pragma once
#include "../simt_host.h"
