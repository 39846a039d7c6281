-- cli_spec.lua: the command line, `handler map SCRIPT.lua [INPUT...]`:
-- JSON Lines in and out, failures per line, the exit statuses, --halt, an
-- interrupted run completed with --resume, bad usage.
local H = require("spec.support.helpers")

local q = H.shell_quote
local BIN = "bin/handler"

-- Runs the command; returns its exit status, stdout, stderr.
local function handler_cmd(args, dir)
  local out, err = dir .. "/stdout", dir .. "/stderr"
  local cmd = H.lua_env() .. " timeout -s KILL 60 luajit " .. BIN .. " " .. args .. " > " .. q(out)
    .. " 2> " .. q(err) .. "; echo $? > " .. q(dir .. "/status")
  os.execute(cmd)
  return tonumber(H.read_file(dir .. "/status")), H.read_file(out) or "", H.read_file(err) or ""
end

local function lines_of(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

-- The JSON lines of s, decoded (key order is the encoder's business).
local function json_lines(s)
  local cjson = require("cjson")
  local t = {}
  for k, l in ipairs(lines_of(s)) do t[k] = cjson.decode(l) end
  return t
end

local SCRIPT = [[
return function(rec)
  if rec.kind == "hang" then while true do end end
  if rec.kind == "boom" then error("bad record " .. rec.id, 0) end
  return { id = rec.id, double = rec.n * 2 }
end
]]

describe("handler map", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rm_r(dir) end)

  local function files(script, input)
    H.write_file(dir .. "/s.lua", script)
    H.write_file(dir .. "/in.jsonl", input)
    return q(dir .. "/s.lua"), q(dir .. "/in.jsonl")
  end

  it("writes each result as a JSON line in input order, and exits 0", function()
    local s, i = files(SCRIPT, '{"id":1,"n":1}\n{"id":2,"n":2}\n\n{"id":3,"n":3}\n')
    local status, out, err = handler_cmd("map " .. s .. " " .. i .. " -j 2", dir)
    assert.are.equal(0, status, err)
    assert.are.same({ { double = 2, id = 1 }, { double = 4, id = 2 }, { double = 6, id = 3 } },
      json_lines(out))
    assert.matches("3 records, 0 failed", err)
  end)

  it("reports each failure as a JSON line naming its line, goes on, and exits 1", function()
    local s, i = files(SCRIPT,
      '{"id":1,"n":1}\n{"id":2,"kind":"boom"}\nnot json\n{"id":4,"kind":"hang"}\n{"id":5,"n":5}\n')
    local status, out, err = handler_cmd("map " .. s .. " " .. i .. " --max-ms 300 --errors "
      .. q(dir .. "/errors"), dir)
    assert.are.equal(1, status, err)
    assert.are.same({ { double = 2, id = 1 }, { double = 10, id = 5 } }, json_lines(out))
    local cjson = require("cjson")
    local errs = {}
    for _, l in ipairs(lines_of(H.read_file(dir .. "/errors"))) do
      local e = cjson.decode(l)
      errs[e.line] = e
    end
    assert.are.equal("ProcessExit", errs[2].type)
    assert.are.equal("bad record 2", errs[2].reason)
    assert.are.equal("BadInput", errs[3].type)
    assert.are.equal("Timeout", errs[4].type)
    assert.are.equal("Took more than 300ms to complete", errs[4].message)
  end)

  it("gives the same lines batched as one record per job, joblog and errors included", function()
    local input = {}
    for k = 1, 400 do
      input[k] = k % 97 == 0 and '{"id":' .. k .. ',"kind":"boom"}'
        or k == 200 and '{"id":200,"kind":"hang"}' or '{"id":' .. k .. ',"n":' .. k .. '}'
    end
    local s, i = files(SCRIPT, table.concat(input, "\n") .. "\n")
    local runs = {}
    for _, batch in ipairs({ "--batch 1", "--batch 64" }) do
      local status, out, err = handler_cmd("map " .. s .. " " .. i .. " -j 2 --max-ms 300 "
        .. batch .. " --errors " .. q(dir .. "/errors") .. " --joblog " .. q(dir .. "/joblog"),
        dir)
      assert.are.equal(1, status, err)
      local failed = {}
      for _, l in ipairs(lines_of(H.read_file(dir .. "/errors"))) do
        local e = require("cjson").decode(l)
        failed[#failed + 1] = e.line .. " " .. e.type
      end
      table.sort(failed)
      local logged = lines_of(H.read_file(dir .. "/joblog"))
      runs[#runs + 1] = { out = out, failed = table.concat(failed, ","), logged = #logged }
    end
    assert.are.same(json_lines(runs[1].out), json_lines(runs[2].out))
    assert.are.equal(400 - 5, #lines_of(runs[2].out))
    assert.are.equal("194 ProcessExit,200 Timeout,291 ProcessExit,388 ProcessExit,97 ProcessExit",
      runs[2].failed)
    assert.are.equal(runs[1].failed, runs[2].failed)
    assert.are.equal(400, runs[1].logged)
    assert.are.equal(400, runs[2].logged)
  end)

  it("logs each record's own time in --joblog, for records run together too", function()
    local s, i = files([[
      return function(r)
        local c = os.clock()
        while (os.clock() - c) * 1000 < r.ms do end
        return r.id
      end
    ]], (function()
      local t = {}
      for k = 1, 300 do t[k] = '{"id":' .. k .. ',"ms":' .. (k == 150 and 60 or 0) .. '}' end
      return table.concat(t, "\n") .. "\n"
    end)())
    local status, _, err = handler_cmd("map " .. s .. " " .. i .. " -j 1 --joblog "
      .. q(dir .. "/joblog"), dir)
    assert.are.equal(0, status, err)
    local wall = {}
    for _, l in ipairs(lines_of(H.read_file(dir .. "/joblog"))) do
      local line, ms = l:match("^(%d+)\tok\t([%d.]+)\t")
      wall[tonumber(line)] = tonumber(ms)
    end
    for k = 1, 300 do
      -- The worker sends the replies of quick records together; each one
      -- still has the time it took, not a share of when the host heard.
      assert.is_true(wall[k] > 0, "record " .. k .. ": " .. tostring(wall[k]))
      if k == 150 then
        assert.is_true(wall[k] >= 50, "the slow record took " .. wall[k] .. " ms")
      else
        assert.is_true(wall[k] < 40, "record " .. k .. " took " .. wall[k] .. " ms")
      end
    end
  end)

  it("reads lines longer than its read blocks, and a last line without a newline", function()
    local long = string.rep("x", 200000)
    local text = '{"id":1,"n":1}\n{"id":2,"n":2,"pad":"' .. long .. '"}\n\n{"id":3,"n":3}'
    local s, i = files(SCRIPT, text)
    for _, from in ipairs({ i, "- < " .. i }) do
      local status, out, err = handler_cmd("map " .. s .. " " .. from .. " -j 2 --joblog "
        .. q(dir .. "/joblog"), dir)
      assert.are.equal(0, status, err)
      assert.are.same({ { double = 2, id = 1 }, { double = 4, id = 2 }, { double = 6, id = 3 } },
        json_lines(out))
      -- Line numbers count the blank line.
      local logged = {}
      for _, l in ipairs(lines_of(H.read_file(dir .. "/joblog"))) do
        logged[#logged + 1] = tonumber(l:match("^(%d+)\t"))
      end
      table.sort(logged)
      assert.are.same({ 1, 2, 4 }, logged)
      os.remove(dir .. "/joblog")
    end
  end)

  it("writes results as they finish with --unordered", function()
    local s, i = files([[
      return function(r)
        local c = os.clock()
        while os.clock() - c < r.wait do end
        return r.id
      end
    ]], '{"id":1,"wait":0.4}\n{"id":2,"wait":0}\n{"id":3,"wait":0}\n')
    local status, out = handler_cmd("map " .. s .. " " .. i .. " --unordered -j 2", dir)
    assert.are.equal(0, status)
    local got = lines_of(out)
    assert.are.equal(3, #got)
    assert.are.equal("1", got[3])
  end)

  it("takes a script's init and plain text lines", function()
    local s, i = files([[
      return { init = function() PREFIX = ">" end, map = function(line) return PREFIX .. line end }
    ]], "a\nb\n")
    local status, out = handler_cmd("map " .. s .. " " .. i .. " --lines", dir)
    assert.are.equal(0, status)
    assert.are.same({ '">a"', '">b"' }, lines_of(out))
  end)

  it("runs records in the sandbox with --sandbox", function()
    local s, i = files([[
      return function(r) return { id = r.id, io = io.open ~= nil } end
    ]], '{"id":1}\nnot json\n')
    local status, out, err = handler_cmd("map " .. s .. " " .. i .. " --sandbox", dir)
    assert.are.equal(1, status, err)
    assert.are.same({ { id = 1, io = false } }, json_lines(out))
    assert.matches('"type":"BadInput"', err)
  end)

  it("stops after --halt failures with exit status 3", function()
    local input = {}
    for k = 1, 50 do input[k] = '{"id":' .. k .. ',"kind":"boom"}' end
    local s, i = files(SCRIPT, table.concat(input, "\n") .. "\n")
    local status, out, err = handler_cmd("map " .. s .. " " .. i .. " --halt 2 -j 1", dir)
    assert.are.equal(3, status, err)
    assert.are.equal("", out)
    local n = #lines_of(err:gsub("handler map:[^\n]*\n?", ""))
    assert.is_true(n >= 2 and n < 50, n .. " failures written")
  end)

  it("ends what is in flight on SIGTERM, exits 3, and --resume completes the rest once", function()
    local input = {}
    for k = 1, 30 do input[k] = '{"id":' .. k .. ',"n":' .. k .. '}' end
    local s, i = files([[
      return function(r)
        local c = os.clock()
        while os.clock() - c < 0.05 do end
        return r.id
      end
    ]], table.concat(input, "\n") .. "\n")
    local log = q(dir .. "/joblog")
    local run = H.lua_env() .. " luajit " .. BIN .. " map " .. s .. " " .. i .. " -j 2 --joblog "
      .. log .. " > " .. q(dir .. "/out1") .. " 2> " .. q(dir .. "/err1")
    -- The command's own pid, to signal it (no pkill: under the sanitizer
    -- build's LD_PRELOAD it can hang).
    os.execute("(" .. run .. " & echo $! > " .. q(dir .. "/pid") .. "; wait $!; echo $? > "
      .. q(dir .. "/status1") .. ") &")
    assert.is_true(H.wait_until(function() return H.exists(dir .. "/pid") end, 20))
    local pid = tonumber(H.read_file(dir .. "/pid"))
    -- Once some records are written, the command is interrupted.
    assert.is_true(H.wait_until(function()
      return #lines_of(H.read_file(dir .. "/out1") or "") > 0 or H.exists(dir .. "/status1")
    end, 20))
    H.signal(pid, 15)
    assert.is_true(H.wait_until(function() return H.exists(dir .. "/status1") end, 20))
    assert.are.equal(3, tonumber(H.read_file(dir .. "/status1")))
    local first = lines_of(H.read_file(dir .. "/out1"))
    assert.is_true(#first > 0 and #first < 30, #first .. " written before the stop")
    assert.are.equal(#first, #lines_of(H.read_file(dir .. "/joblog")))
    local status, out = handler_cmd("map " .. s .. " " .. i .. " -j 2 --joblog " .. log
      .. " --resume", dir)
    assert.are.equal(0, status)
    local all = {}
    for _, l in ipairs(first) do all[#all + 1] = tonumber(l) end
    for _, l in ipairs(lines_of(out)) do all[#all + 1] = tonumber(l) end
    table.sort(all)
    local want = {}
    for k = 1, 30 do want[k] = k end
    assert.are.same(want, all)
    assert.are.equal(30, #lines_of(H.read_file(dir .. "/joblog")))
  end)

  it("shows a progress line with --progress", function()
    local s, i = files(SCRIPT, '{"id":1,"n":1}\n')
    local status, _, err = handler_cmd("map " .. s .. " " .. i .. " --progress", dir)
    assert.are.equal(0, status)
    assert.matches("1 done, 0 failed", err)
  end)

  it("exits 2 on bad usage or a script that does not load, saying why", function()
    local s, i = files("return 42", "{}\n")
    H.write_file(dir .. "/broken.lua", "return function(")
    local cases = {
      { "map", "no SCRIPT.lua given" },
      { "frobnicate x.lua", "unknown command frobnicate" },
      { "map " .. s .. " --jobs 0", "%-%-jobs: expected a whole number > 0" },
      { "map " .. s .. " --max-heap lots", "%-%-max%-heap: not a number of bytes" },
      { "map " .. s .. " --wat", "unknown option %-%-wat" },
      { "map " .. s .. " --resume", "%-%-resume needs %-%-joblog" },
      { "map " .. s .. " --batch 0", "%-%-batch: expected a whole number > 0" },
      { "map " .. s .. " --batch 5000", "%-%-batch: at most 1024 records, got 5000" },
      { "map " .. s .. " " .. i, ".*s%.lua must return a function record %-> result" },
      { "map " .. q(dir .. "/broken.lua") .. " " .. i, "cannot load .*broken.lua" },
      { "map " .. q(dir .. "/missing.lua") .. " " .. i, "cannot load .*missing.lua" },
    }
    for _, c in ipairs(cases) do
      local status, _, err = handler_cmd(c[1], dir)
      assert.are.equal(2, status, c[1] .. ": " .. err)
      assert.matches("^handler map: " .. c[2], err)
    end
    local status, out = handler_cmd("--help", dir)
    assert.are.equal(0, status)
    assert.matches("usage: handler map SCRIPT.lua", out)
  end)
end)
