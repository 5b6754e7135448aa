// A CUDA injection library (the GPU machines have no Nsight Systems): run a
// program with CUDA_INJECTION64_PATH=libtrace.so and it writes the GPU start
// and end time (ns) of every kernel, copy and memset to $TRACE_OUT
// (default /tmp/trace.tsv), one "K|C|S <tab> start <tab> end <tab> name"
// line each, through CUPTI's activity API. benches/gpu/trace.sh builds it
// (against CUPTI 13.0, the GPU machines' PyTorch's) and gaps.py reads it.
// TRACE_NONAME=1 leaves kernel names out. TRACE_API=1 adds the host's
// driver API calls as "A" lines (start, end, the call's name), to see what
// the host did during the GPU's idle gaps (gaps.py lists them under
// each gap of 20 us or more).
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static FILE *out;
#define BUF (8 << 20)
static void CUPTIAPI req(uint8_t **b, size_t *size, size_t *max) {
  *b = (uint8_t *)aligned_alloc(8, BUF); *size = BUF; *max = 0;
}
static void CUPTIAPI done(CUcontext c, uint32_t s, uint8_t *b, size_t size, size_t valid) {
  CUpti_Activity *r = NULL;
  while (cuptiActivityGetNextRecord(b, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
      fprintf(out, "K\t%llu\t%llu\t%s\n", (unsigned long long)k->start, (unsigned long long)k->end, getenv("TRACE_NONAME") ? "k" : k->name);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      fprintf(out, "C\t%llu\t%llu\tmemcpy%d_%llu\n", (unsigned long long)m->start, (unsigned long long)m->end, m->copyKind, (unsigned long long)m->bytes);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
      CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)r;
      const char *name = NULL;
      cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
      fprintf(out, "A\t%llu\t%llu\t%s\n", (unsigned long long)a->start, (unsigned long long)a->end, name ? name : "?");
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      fprintf(out, "S\t%llu\t%llu\tmemset_%llu\n", (unsigned long long)m->start, (unsigned long long)m->end, (unsigned long long)m->bytes);
    }
  }
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(c, s, &dropped);
  if (dropped) fprintf(out, "D\t0\t0\tdropped_%zu\n", dropped);
  free(b);
}
static void fin(void) { cuptiActivityFlushAll(1); if (out) fclose(out); }
int InitializeInjection(void) {
  const char *p = getenv("TRACE_OUT");
  out = fopen(p ? p : "/tmp/trace.tsv", "w");
  cuptiActivityRegisterCallbacks(req, done);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  if (getenv("TRACE_API")) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
  atexit(fin);
  return 1;
}
