/* A stand-in for the CUDA driver library (libcuda.so.1), for perf.hostcost.
 *
 * Every function returns CUDA_SUCCESS (0) at once and does no GPU work. Output parameters get
 * plausible values of one H100-class device (compute capability 9.0, 132 SMs, 227 KiB of opt-in
 * shared memory), so Triton's driver module (cuda_utils) and its C launchers run their real code
 * paths: argument extraction, pointer checks, launch configuration, cuLaunchKernelEx.
 *
 * The functions are those Triton 3.6 to 3.9 look up (at link time, or with dlopen/dlsym); the
 * parameters are declared with plain C types (no cuda.h needed), as the C ABI sees them.
 * cuLaunchKernelEx counts its calls in hostcost_stub_launches (read with ctypes).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int CUresult; /* CUDA_SUCCESS == 0 */

unsigned long long hostcost_stub_launches = 0;

static int context_token;  /* what the current context points at */
static uintptr_t next_handle = 0x1000;

static void *new_handle(void) {
  next_handle += 0x100;
  return (void *)next_handle;
}

CUresult cuInit(unsigned int flags) { return 0; }

CUresult cuDriverGetVersion(int *version) {
  *version = 12080;
  return 0;
}

CUresult cuGetErrorString(CUresult error, const char **str) {
  *str = "stub CUDA driver (perf.hostcost)";
  return 0;
}

CUresult cuGetErrorName(CUresult error, const char **str) {
  *str = "CUDA_STUB";
  return 0;
}

CUresult cuDeviceGetCount(int *count) {
  *count = 1;
  return 0;
}

CUresult cuDeviceGet(int *device, int ordinal) {
  *device = ordinal;
  return 0;
}

CUresult cuDeviceGetName(char *name, int len, int device) {
  if (len > 0) {
    strncpy(name, "Stub H100 (perf.hostcost)", (size_t)len - 1);
    name[len - 1] = '\0';
  }
  return 0;
}

/* CUdevice_attribute values from cuda.h */
CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  switch (attribute) {
  case 1: /* MAX_THREADS_PER_BLOCK */
    *value = 1024;
    break;
  case 8: /* MAX_SHARED_MEMORY_PER_BLOCK */
    *value = 49152;
    break;
  case 10: /* WARP_SIZE */
    *value = 32;
    break;
  case 12: /* MAX_REGISTERS_PER_BLOCK */
    *value = 65536;
    break;
  case 13: /* CLOCK_RATE (kHz) */
    *value = 1980000;
    break;
  case 16: /* MULTIPROCESSOR_COUNT */
    *value = 132;
    break;
  case 36: /* MEMORY_CLOCK_RATE (kHz) */
    *value = 2619000;
    break;
  case 37: /* GLOBAL_MEMORY_BUS_WIDTH */
    *value = 5120;
    break;
  case 75: /* COMPUTE_CAPABILITY_MAJOR */
    *value = 9;
    break;
  case 76: /* COMPUTE_CAPABILITY_MINOR */
    *value = 0;
    break;
  case 81: /* MAX_SHARED_MEMORY_PER_MULTIPROCESSOR */
    *value = 233472;
    break;
  case 97: /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    *value = 232448;
    break;
  default:
    *value = 0;
  }
  return 0;
}

CUresult cuDevicePrimaryCtxRetain(void **context, int device) {
  *context = &context_token;
  return 0;
}

CUresult cuDevicePrimaryCtxRelease_v2(int device) { return 0; }

CUresult cuCtxGetCurrent(void **context) {
  *context = &context_token;
  return 0;
}

CUresult cuCtxSetCurrent(void *context) { return 0; }

CUresult cuCtxGetDevice(int *device) {
  *device = 0;
  return 0;
}

CUresult cuCtxGetLimit(size_t *value, int limit) {
  *value = 0;
  return 0;
}

CUresult cuCtxSetLimit(int limit, size_t value) { return 0; }

CUresult cuCtxSynchronize(void) { return 0; }

CUresult cuStreamSynchronize(void *stream) { return 0; }

CUresult cuStreamIsCapturing(void *stream, int *status) {
  *status = 0; /* CU_STREAM_CAPTURE_STATUS_NONE */
  return 0;
}

CUresult cuModuleLoadData(void **module, const void *image) {
  *module = new_handle();
  return 0;
}

CUresult cuModuleGetFunction(void **function, void *module, const char *name) {
  *function = new_handle();
  return 0;
}

CUresult cuModuleUnload(void *module) { return 0; }

CUresult cuFuncGetAttribute(int *value, int attribute, void *function) {
  *value = attribute == 0 ? 1024 : 0; /* MAX_THREADS_PER_BLOCK; no registers, spills, smem */
  return 0;
}

CUresult cuFuncSetAttribute(void *function, int attribute, int value) { return 0; }

CUresult cuFuncSetCacheConfig(void *function, int config) { return 0; }

CUresult cuOccupancyMaxActiveClusters(int *clusters, void *function, const void *config) {
  *clusters = 1;
  return 0;
}

/* Tensor-map encoders: arguments ignored (tritonnorm's kernels take no descriptors). */
CUresult cuTensorMapEncodeTiled() { return 0; }

CUresult cuTensorMapEncodeIm2col() { return 0; }

CUresult cuLaunchKernelEx(const void *config, void *function, void **params, void **extra) {
  ++hostcost_stub_launches;
  return 0;
}

CUresult cuLaunchKernel(void *function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, void *stream, void **params,
                        void **extra) {
  ++hostcost_stub_launches;
  return 0;
}

/* Host memory stands in for device memory: a pointer is its own device pointer. */
CUresult cuPointerGetAttribute(void *data, int attribute, unsigned long long pointer) {
  if (attribute == 3) /* CU_POINTER_ATTRIBUTE_DEVICE_POINTER */
    *(unsigned long long *)data = pointer;
  return 0;
}

CUresult cuPointerGetAttributes(unsigned count, int *attributes, void **data,
                                unsigned long long pointer) {
  for (unsigned i = 0; i < count; ++i)
    if (attributes[i] == 3)
      *(unsigned long long *)data[i] = pointer;
  return 0;
}

/* Any function of this library by name (what a runtime asking the driver for entry points gets). */
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                             int *status) {
  Dl_info info;
  void *self = NULL;
  if (dladdr((void *)cuGetProcAddress_v2, &info) && info.dli_fname)
    self = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  *pfn = self ? dlsym(self, symbol) : NULL;
  if (status)
    *status = *pfn ? 0 : 1;
  return *pfn ? 0 : 500; /* CUDA_ERROR_NOT_FOUND */
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags) {
  return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}
