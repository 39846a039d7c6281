/* worker.h: the job loop of one worker process. */
#ifndef HD_WORKER_H
#define HD_WORKER_H

/* Builds the pristine state every job starts from, with `path` and `cpath`
 * as its package.path and cpath. Called once, in the supervisor, before it
 * forks any worker. */
int hd_worker_prepare(const char *path, const char *cpath);

/* Returns a malloc'd copy of a ';'-separated module path whose relative
 * entries are made absolute against `cwd` (NULL: the current directory). */
char *hd_worker_abspaths(const char *paths, const char *cwd);

/* Serves jobs on `fd` until the parent closes it, or until a job tainted
 * the process; returns the exit code. */
int hd_worker_run(int fd, int flags);

#endif
