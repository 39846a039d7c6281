/* worker.h: the job loop of one worker process. */
#ifndef HD_WORKER_H
#define HD_WORKER_H

/* Serves jobs on `fd` until the parent closes it; returns the exit code.
 * `path` and `cpath` become each fresh state's package.path and cpath. */
int hd_worker_run(int fd, const char *path, const char *cpath);

#endif
