/* The build's key (sources, flags and CPU: kernel_build.key), kept as bytes in the library so that a build from
 * other sources or for another CPU is recognised by reading the file, before anything in it is loaded or run. */
#ifndef GRIDSERVE_KERNEL_KEY
#define GRIDSERVE_KERNEL_KEY "unknown"
#endif

__attribute__((used)) const char gridserve_kernel_key[] = "gridserve-kernel-key:" GRIDSERVE_KERNEL_KEY;
