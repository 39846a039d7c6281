-- util.lua: what bench.lua and soak.lua share: a monotonic clock, order
-- statistics, /proc readings (RSS, PSS, fds, child processes) and process
-- spawning, all through the LuaJIT FFI so that measuring starts no process.
local ffi = require("ffi")

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk, bench_timespec *ts);
int poll(void *fds, unsigned long nfds, int timeout);
typedef struct bench_dir bench_dir;
typedef struct {
  uint64_t d_ino; int64_t d_off; unsigned short d_reclen; unsigned char d_type;
  char d_name[256];
} bench_dirent;
bench_dir *opendir(const char *name);
bench_dirent *readdir(bench_dir *d);
int closedir(bench_dir *d);
int getpid(void);
int posix_spawnp(int *pid, const char *file, const void *fa, const void *attr,
                 char *const argv[], char *const envp[]);
int waitpid(int pid, int *status, int options);
extern char **environ;
]]

local C = ffi.C
local floor, tonumber, open = math.floor, tonumber, io.open

local M = {}

local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

--- now() -> nanoseconds on the monotonic clock, as a Lua number.
function M.now()
  C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

--- sleep_ms(ms): sleeps without starting a process.
function M.sleep_ms(ms)
  C.poll(nil, 0, ms)
end

--- summary(samples) -> { n, min, median, p99, max, mean } (sorts samples).
function M.summary(s)
  local n = #s
  if n == 0 then return { n = 0 } end
  table.sort(s)
  local sum = 0
  for i = 1, n do sum = sum + s[i] end
  return {
    n = n, min = s[1], median = s[floor(n / 2) + 1],
    p99 = s[math.min(n, floor(n * 0.99) + 1)], max = s[n], mean = sum / n,
  }
end

local function read_file(path)
  local f = open(path, "r")
  if f == nil then return nil end
  local s = f:read("*a")
  f:close()
  return s
end
M.read_file = read_file

--- mem_kb(pid) -> rss_kb, pss_kb (from smaps_rollup; nil when the process is gone).
function M.mem_kb(pid)
  local s = read_file("/proc/" .. (pid or "self") .. "/smaps_rollup")
  if s == nil then return nil end
  return tonumber(s:match("\nRss:%s+(%d+)")), tonumber(s:match("\nPss:%s+(%d+)"))
end

--- alive(pid) -> whether the process exists and is not a zombie.
function M.alive(pid)
  local f = open("/proc/" .. pid .. "/stat", "r")
  if f == nil then return false end
  local s = f:read("*l")
  f:close()
  if s == nil then return false end
  local state = s:match("^%d+ %b() (%a)")
  return state ~= "Z" and state ~= "X"
end

--- entries(dir) -> the number of entries of a directory, "." and ".." excluded.
function M.entries(dir)
  local d = C.opendir(dir)
  if d == nil then return nil end
  local n = 0
  while true do
    local e = C.readdir(d)
    if e == nil then break end
    local name = ffi.string(e.d_name)
    if name ~= "." and name ~= ".." then n = n + 1 end
  end
  C.closedir(d)
  return n
end

--- fd_count() -> open fds of this process (the directory stream's own fd excluded).
function M.fd_count()
  return M.entries("/proc/self/fd") - 1
end

M.pid = C.getpid()

--- children(pid) -> list of the pids of pid's children (every thread's).
function M.children(pid)
  local out = {}
  local d = C.opendir("/proc/" .. pid .. "/task")
  if d == nil then return out end
  local tids = {}
  while true do
    local e = C.readdir(d)
    if e == nil then break end
    local name = ffi.string(e.d_name)
    if name:match("^%d+$") then tids[#tids + 1] = name end
  end
  C.closedir(d)
  for _, tid in ipairs(tids) do
    local s = read_file("/proc/" .. pid .. "/task/" .. tid .. "/children") or ""
    for c in s:gmatch("%d+") do out[#out + 1] = tonumber(c) end
  end
  return out
end

--- descendants(pid) -> the number of processes below pid, at any depth.
function M.descendants(pid)
  local n = 0
  for _, c in ipairs(M.children(pid)) do n = n + 1 + M.descendants(c) end
  return n
end

--- spawn_wait(argv) -> wait status, nanoseconds from spawn to reaped.
-- The child inherits this process's environment and stdio.
function M.spawn_wait(argv)
  local keep, cargv = {}, ffi.new("char *[?]", #argv + 1)
  for i, a in ipairs(argv) do
    keep[i] = ffi.new("char[?]", #a + 1, a)
    cargv[i - 1] = keep[i]
  end
  local pid, status = ffi.new("int[1]"), ffi.new("int[1]")
  local t0 = M.now()
  local rc = C.posix_spawnp(pid, argv[1], nil, nil, cargv, C.environ)
  if rc ~= 0 then error("posix_spawnp " .. argv[1] .. " failed: " .. rc) end
  while C.waitpid(pid[0], status, 0) < 0 do
    if ffi.errno() ~= 4 then error("waitpid failed: " .. ffi.errno()) end
  end
  return status[0], M.now() - t0
end

return M
