// fa3_timeline.cu: rung 7 (fa3_forward.cu) built with its timeline (FA3_TIMELINE): each kernel takes one more
// parameter, an int64 buffer where the elected thread of every warpgroup of CTAs 0 and 1 stamps its phases
// (%globaltimer and %clock64 at each start and end). A debug instance only: the stamps cost time and registers.
// Read through flashlib.cupy_kernels.timeline.
#define FA3_TIMELINE
#include "fa3_forward.cu"
