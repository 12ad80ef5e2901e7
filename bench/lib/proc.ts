/** Readings of live processes from /proc, shared by the benchmark scripts. */
import { spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"

/** `/proc/<pid>/stat` counts CPU time in clock ticks. */
const clockTicks = Number(spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).stdout.trim()) || 100

/**
 * User + system CPU seconds of a process (utime + stime), or with `children` of its waited-for children
 * (cutime + cstime); undefined once it is gone.
 */
export const cpuSeconds = (pid: number | "self", children = false): number | undefined => {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8")
    // fields after "(comm) ": state is field 3, utime 14, stime 15, cutime 16, cstime 17
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
    const at = children ? 13 : 11
    return (Number(fields[at]) + Number(fields[at + 1])) / clockTicks
  } catch {
    return undefined
  }
}

/** The peak RSS (VmHWM) of a live process in KiB, from /proc/<pid>/status; undefined once it is gone. */
export const peakRssKiB = (pid: number): number | undefined => {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))
    return m === null ? undefined : Number(m[1])
  } catch {
    return undefined
  }
}

/**
 * Memory on these VMs is slow to touch the first time after it was freed for a few seconds (free-page
 * reporting hands it back to the host, which must fault it in again): a run allocating it pays that, `cp`
 * about 0.25 s per GiB of page cache, `vma create` up to 0.4 s. So before each timed run a helper process
 * touches 3 GiB and exits: the run then allocates memory that was just freed, as on a machine without
 * this effect.
 */
export const warmMemory = (): Promise<void> =>
  new Promise<void>((resolve) =>
    spawn(process.execPath, ["-e", "Buffer.alloc(3 * 2 ** 30, 1)"], { stdio: "ignore" }).on("exit", () => resolve())
  )
