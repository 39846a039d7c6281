-- capture_spec.lua: the output option: "capture" keeps what a job writes
-- to its stdout and stderr for job:output(), "discard" drops it, both within
-- max_output_bytes; "inherit" (the default) is output_spec's.
local handler = require("handler")
local H = require("spec.support.helpers")

describe("the output option", function()
  local pool
  H.leak_checked()
  before_each(function() pool = handler.pool{ max_workers = 2 } end)
  after_each(function() pool:close() end)

  it("captures what a job writes to 1 and 2, however it writes it", function()
    local job = assert(pool:async(function()
      print("printed")
      io.write("written ")
      io.stderr:write("to stderr\n")
      io.flush()
      os.execute("echo from a command")
      return "done"
    end, { output = "capture" }))
    assert.are.same({ true, "done" }, { job:await() })
    local out = job:output()
    for _, piece in ipairs({ "printed\n", "written ", "to stderr\n", "from a command\n" }) do
      assert.is_truthy(out:find(piece, 1, true), ("%q lacks %q"):format(out, piece))
    end
    assert.are.equal(#"printed\nwritten to stderr\nfrom a command\n", #out)
  end)

  it("keeps each job's output its own on a reused worker", function()
    local a = assert(pool:async(function() io.write("A") return 1 end, { output = "capture" }))
    a:await()
    local b = assert(pool:async(function() io.write("B") return 2 end, { output = "capture" }))
    b:await()
    assert.are.equal("A", a:output())
    assert.are.equal("B", b:output())
  end)

  it("captures within max_output_bytes, and the limit still ends the job", function()
    local job = assert(pool:async(function()
      io.write(string.rep("y", 100000))
      io.flush()
      return "never"
    end, { output = "capture", max_output_bytes = 10 }))
    local ok, err = job:await()
    assert.is_false(ok)
    assert.are.equal("output limit", err.reason)
    assert.are.equal(string.rep("y", 10), job:output())
  end)

  it("discards, and counts what it discards against the limit", function()
    local dir = H.tmpdir()
    local out = H.run_host(([[
      local handler = require("handler")
      local p = handler.pool{}
      local j = p:async(function() print("must not show") return 1 end, { output = "discard" })
      local ok = j:await()
      io.write("ok=", tostring(ok), " output=", tostring(j:output()), "\n")
      local j2 = p:async(function() io.write(string.rep("z", 1000)) io.flush() return 1 end,
        { output = "discard", max_output_bytes = 10 })
      local ok2, e = j2:await()
      io.write("ok2=", tostring(ok2), " reason=", tostring(e and e.reason), "\n")
    ]]))
    assert.are.equal("ok=true output=nil\nok2=false reason=output limit\n", out)
    H.rm_r(dir)
  end)

  it("gives nil for a job that does not capture, and refuses a bad mode", function()
    local job = assert(pool:async(function() return 1 end))
    job:await()
    assert.is_nil(job:output())
    local ok, err = pcall(pool.async, pool, print, { output = "file" })
    assert.is_false(ok)
    assert.matches("pool:async: bad option 'output' %(expected \"inherit\", \"capture\" or \"discard\"", err)
  end)
end)
