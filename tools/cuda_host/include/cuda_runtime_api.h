// Host-harness stand-in for the CUDA runtime header (tools/cuda_host/cuda_host.h has the definitions).
#pragma once
#include "../cuda_host.h"
