// SPDX-License-Identifier: Apache-2.0
// Host emulation (csrc/emu/): <cuda_bf16.h> of kernel sources compiled with the host compiler.
#pragma once
#include "../simt_host.h"
