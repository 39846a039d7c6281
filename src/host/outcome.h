/* outcome.h: how a job ends, as the host's layers count and report it. */
#ifndef HD_OUTCOME_H
#define HD_OUTCOME_H

typedef enum hd_outcome {
  HD_OUT_NONE = 0,
  HD_OUT_OK,
  HD_OUT_ERROR,     /* the job raised; the reply holds reason and traceback */
  HD_OUT_OOM,
  HD_OUT_BADRESULT, /* the reply holds why the results cannot travel */
  HD_OUT_TIMEOUT,
  HD_OUT_EXIT,      /* the process died: its wait status, or -1 */
  HD_OUT_KILLED,    /* a user killed it */
  HD_OUT_BADREPLY,  /* the worker broke the protocol; the detail says how */
  HD_OUT_FAILED,    /* the worker could not be started or was lost; the detail says why */
  HD_OUT_OUTPUT,    /* the job wrote more than max_output; the detail says how much */
  HD_OUT_CPUTIME,   /* the job used more than max_cpu_ms of CPU time */
  HD_OUT_NOWORKERS, /* rejected: no slot */
  HD_OUT_NOMEMORY,  /* rejected: no memory budget */
  HD_OUT_POOLTIMEOUT,
  HD_OUT_COUNT
} hd_outcome;

/* Whether the job never ran: no capacity for it. */
#define HD_OUT_IS_REJECT(o) ((o) == HD_OUT_NOWORKERS || (o) == HD_OUT_NOMEMORY || (o) == HD_OUT_POOLTIMEOUT)

#endif
