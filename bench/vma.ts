/**
 * VMA writer/reader benchmark: `npx tsx bench/vma.ts [--size 1G]`.
 *
 * Creates a disk image of the given size (about 90 % random data, 10 % holes) under $BENCH_DIR (or /tmp),
 * then times, in one run:
 *   - `cp` of the disk (the baseline for create and extract),
 *   - `vma create` (uncompressed) and `vma extract` of the result,
 *   - `zstd -1 -T0` over the same VMA stream (the baseline for compressed writing),
 *   - `vma create` to `.vma.zst` with the same zstd settings (zstd in-process), and `vma verify` of it from
 *     stdin,
 *   - `vma create exec:zstd …`: the same stream piped to a `zstd` process (the alternative compressor).
 * The `vma` runs are child processes of `node packages/target-vma/bin/vma.mjs`; their peak RSS is read from
 * /proc/<pid>/status (VmHWM). Startup time of the CLI (a `vma list` of a tiny archive) is shown separately.
 * The steps run in BENCH_REPEAT rounds (default 5, after a warm-up round), one after the other in each
 * round, with dirty pages flushed, memory warmed and the step's previous output deleted before each run
 * (see `rounds` and `warmMemory`); each step's median time and largest peak RSS are kept. Ratios are given
 * twice: for whole commands (Node startup included, as the issue compares `vma` with `cp`/`zstd` commands)
 * and with the median `vma list` time (startup) subtracted.
 */
import { spawn } from "node:child_process"
import { createHash, randomFillSync } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { pipeline } from "node:stream/promises"
import { fileURLToPath } from "node:url"
import { median, parseSize } from "./lib/numbers.js"
import { peakRssKiB, warmMemory } from "./lib/proc.js"

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
// BENCH_VMA_BIN: another `vma` entry point (e.g. an older build) to compare under the same conditions.
const vmaBin = process.env.BENCH_VMA_BIN ?? path.join(root, "packages/target-vma/bin/vma.mjs")


const argSize = process.argv.indexOf("--size")
const size = parseSize(argSize >= 0 ? process.argv[argSize + 1] ?? "1G" : "1G", 65536)
const base = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), "vma-bench-"))
const out = (s: string) => process.stdout.write(s)

interface Run {
  readonly seconds: number
  /** Every run's time, in round order (for the median). */
  readonly runs?: ReadonlyArray<number> | undefined
  readonly peakRssKiB: number
  readonly code: number
  readonly stderr: string
}

/** Runs a command, polling /proc/<pid>/status for its peak RSS. */
const run = (command: string, args: ReadonlyArray<string>, options: { stdin?: string; stdout?: string } = {}) =>
  new Promise<Run>((resolve, reject) => {
    const stdin = options.stdin === undefined ? "ignore" : fs.openSync(options.stdin, "r")
    const stdout = options.stdout === undefined ? "ignore" : fs.openSync(options.stdout, "wx")
    const start = process.hrtime.bigint()
    const child = spawn(command, args, { stdio: [stdin, stdout, "pipe"] })
    let stderr = ""
    child.stderr!.on("data", (d: Buffer) => {
      stderr += d.toString()
    })
    let peak = 0
    const poll = () => {
      peak = Math.max(peak, peakRssKiB(child.pid!) ?? 0)
    }
    const timer = setInterval(poll, 10)
    child.on("error", reject)
    child.on("exit", (code) => {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9
      clearInterval(timer)
      if (typeof stdin === "number") fs.closeSync(stdin)
      if (typeof stdout === "number") fs.closeSync(stdout)
      resolve({ seconds, peakRssKiB: peak, code: code ?? -1, stderr })
    })
  })

/** Flushes dirty pages first, so no step pays for the previous one's writeback. */
const settle = () =>
  new Promise<void>((resolve) => spawn("sync", [], { stdio: "ignore" }).on("exit", () => resolve()))

const must = async (what: string, r: () => Promise<Run>) => {
  await settle()
  await warmMemory()
  const result = await r()
  if (result.code !== 0) throw new Error(`${what} failed (${result.code}): ${result.stderr.trim()}`)
  return result
}

const sha256 = async (file: string) => {
  const hash = createHash("sha256")
  await pipeline(fs.createReadStream(file, { highWaterMark: 4 << 20 }), hash)
  return hash.digest("hex")
}

const makeDisk = (file: string) => {
  // 1 MiB segments; one in ten (pseudo-randomly chosen) stays a hole.
  const fd = fs.openSync(file, "wx")
  fs.ftruncateSync(fd, size)
  const seg = 1 << 20
  const buf = Buffer.allocUnsafe(seg)
  let state = 12345
  for (let off = 0; off < size; off += seg) {
    state = (state * 1103515245 + 12345) >>> 0
    if ((state >>> 16) % 10 === 0) continue
    const n = Math.min(seg, size - off)
    randomFillSync(buf, 0, n)
    fs.writeSync(fd, buf, 0, n, off)
  }
  fs.closeSync(fd)
}

const fmt = (n: number, d = 2) => n.toFixed(d)
const mib = (bytes: number) => bytes / 2 ** 20

/** The median time and the largest RSS of a step's runs. */
const medianRun = (runs: ReadonlyArray<Run>): Run => ({
  ...runs[0]!,
  seconds: median(runs.map((r) => r.seconds)),
  runs: runs.map((r) => r.seconds),
  peakRssKiB: Math.max(...runs.map((r) => r.peakRssKiB))
})

interface Step {
  readonly name: string
  /** Removes the step's previous output (just before the run, see `rounds`). */
  readonly cleanup: () => void
  readonly run: () => Promise<Run>
}

/**
 * Runs every step once per round, in order, and keeps each step's median over the measured rounds: the
 * reference tools and our commands alternate, so a slower phase of this shared machine hits them alike.
 * Each step deletes its own output of the previous round just before it runs and leaves the others' in
 * place, so every step writes into page cache that was just freed (see `warmMemory` for why that matters
 * on these VMs). A first warm-up round, whose steps have nothing to free, is not counted.
 */
const rounds = async (times: number, steps: ReadonlyArray<Step>): Promise<Map<string, Run>> => {
  const runs = new Map<string, Array<Run>>(steps.map((step) => [step.name, []]))
  for (let round = 0; round <= times; round++) {
    for (const step of steps) {
      step.cleanup()
      const result = await step.run()
      if (round > 0) runs.get(step.name)!.push(result)
    }
  }
  return new Map(steps.map((step) => [step.name, medianRun(runs.get(step.name)!)]))
}

const rm = (...files: Array<string>) => () => {
  for (const f of files) fs.rmSync(f, { recursive: true, force: true })
}

const main = async () => {
  const repeat = Number(process.env.BENCH_REPEAT ?? 5)
  out(`vma: ${vmaBin}\n`)
  out(
    `VMA benchmark: disk ${mib(size)} MiB (~90% random, ~10% holes) in ${base}, ` +
      `medians of ${repeat} rounds after a warm-up round\n`
  )
  const disk = path.join(base, "disk.raw")
  makeDisk(disk)
  const conf = path.join(base, "qemu-server.conf")
  fs.writeFileSync(conf, "name: bench\nmemory: 1024\nscsi0: local:100/vm-100-disk-0.raw,size=1G\n")
  // Warm the page cache for everyone alike.
  await must("cat", () => run("cat", [disk], { stdout: path.join(base, "warm.null") }))
  fs.unlinkSync(path.join(base, "warm.null"))

  const node = process.execPath
  const vma = (args: ReadonlyArray<string>, opts?: { stdin?: string; stdout?: string }) =>
    must(`vma ${args[0]}`, () => run(node, [vmaBin, ...args], opts))
  const device = ["-d", `format=raw:drive-scsi0=${disk}`]

  const tiny = path.join(base, "tiny.vma")
  await vma(["create", tiny, "-c", conf])
  const listOut = path.join(base, "list.out")
  const copy = path.join(base, "disk.cp")
  const archive = path.join(base, "a.vma")
  const extractDir = path.join(base, "x")
  const ref = path.join(base, "ref.zst")
  const zArchive = path.join(base, "a.vma.zst")
  const piped = path.join(base, "piped.vma.zst")
  // zstd's -T0 means one thread per core; vzdump's `zstd: 0` would mean half of them.
  const threads = os.availableParallelism()
  const zstdOptions = ["--zstd-level", "1", "--zstd", String(threads)]
  let roundTripOk = true
  let zBytes = 0
  const steps: ReadonlyArray<Step> = [
    { name: "startup", cleanup: rm(listOut), run: () => vma(["list", tiny], { stdout: listOut }) },
    { name: "cp", cleanup: rm(copy), run: () => must("cp", () => run("cp", [disk, copy])) },
    { name: "create", cleanup: rm(archive), run: () => vma(["create", archive, "-c", conf, ...device]) },
    {
      name: "extract",
      cleanup: rm(extractDir),
      run: async () => {
        const result = await vma(["extract", archive, extractDir])
        // correctness of the round trip (not timed)
        const [a, b] = await Promise.all([sha256(disk), sha256(path.join(extractDir, "disk-drive-scsi0.raw"))])
        roundTripOk &&= a === b
        return result
      }
    },
    {
      name: "zstd",
      cleanup: rm(ref),
      run: () => must("zstd", () => run("zstd", ["-1", "-T0", "-q", "-c", archive], { stdout: ref }))
    },
    {
      name: "createZstd",
      cleanup: rm(zArchive),
      run: async () => {
        const result = await vma(["create", zArchive, ...zstdOptions, "-c", conf, ...device])
        zBytes = fs.statSync(zArchive).size
        return result
      }
    },
    { name: "verifyZstd", cleanup: () => {}, run: () => vma(["verify", "-"], { stdin: zArchive }) },
    // the alternative compressor: the same stream piped to a `zstd` process (exec: output), for the choice
    {
      name: "createPiped",
      cleanup: rm(piped),
      run: () => vma(["create", `exec:zstd -1 --threads=${threads} -q -c > ${piped}`, "-c", conf, ...device])
    }
  ]
  const medians = await rounds(repeat, steps)
  const startup = medians.get("startup")!
  const cp = medians.get("cp")!
  const create = medians.get("create")!
  const extract = medians.get("extract")!
  const zstd = medians.get("zstd")!
  const createZstd = medians.get("createZstd")!
  const verifyZstd = medians.get("verifyZstd")!
  const createPiped = medians.get("createPiped")!
  const vmaBytes = fs.statSync(archive).size
  const vsCp = (r: Run) => `${fmt(r.seconds / cp.seconds)} × cp`
  const vsZstd = (seconds: number) => `${fmt(zstd.seconds / seconds)} × zstd throughput`
  const rows: Array<[string, Run, string, number | undefined]> = [
    ["cp disk", cp, "1.00 × cp", undefined],
    ["vma create (uncompressed)", create, vsCp(create), create.peakRssKiB],
    ["vma extract", extract, vsCp(extract), extract.peakRssKiB],
    ["zstd -1 -T0 over a.vma", zstd, "1.00 × zstd throughput", undefined],
    ["vma create .vma.zst (level 1, T0)", createZstd, vsZstd(createZstd.seconds), createZstd.peakRssKiB],
    ["vma verify - < a.vma.zst", verifyZstd, vsCp(verifyZstd), verifyZstd.peakRssKiB],
    ["vma create | zstd process", createPiped, vsZstd(createPiped.seconds), createPiped.peakRssKiB],
    ["vma list (CLI startup)", startup, "", startup.peakRssKiB]
  ]
  out(`VMA stream: ${fmt(mib(vmaBytes), 1)} MiB; .vma.zst: ${fmt(mib(zBytes), 1)} MiB\n\n`)
  out(
    `${"step".padEnd(36)} ${"seconds".padStart(8)} ${"MiB/s".padStart(8)}  ${"ratio".padEnd(26)} ${
      "peak RSS".padEnd(9)
    } runs (s)\n`
  )
  for (const [name, { runs, seconds }, ratio, rss] of rows) {
    const rssText = rss === undefined ? "" : `${fmt(rss / 1024, 0)} MiB`
    out(
      `${name.padEnd(36)} ${fmt(seconds).padStart(8)} ${fmt(mib(size) / seconds, 0).padStart(8)}  ${
        ratio.padEnd(26)
      } ${rssText.padEnd(9)} ${(runs ?? []).map((r) => fmt(r)).join(" ")}\n`
    )
  }
  const net = (r: Run) => Math.max(0.001, r.seconds - startup.seconds)
  out(`\nratios above: whole commands, Node startup of vma included (${fmt(startup.seconds)} s)\n`)
  out(
    `excluding CLI startup: create ${fmt(net(create) / cp.seconds)} × cp, ` +
      `extract ${fmt(net(extract) / cp.seconds)} × cp, zstd write ${fmt(zstd.seconds / net(createZstd))} × zstd\n`
  )
  const peak = Math.max(create.peakRssKiB, extract.peakRssKiB, createZstd.peakRssKiB, verifyZstd.peakRssKiB)
  const met = (ok: boolean) => ok ? "met" : "missed"
  out(
    `goals (whole commands): create ≤ 1.5 × cp: ${met(create.seconds <= 1.5 * cp.seconds)}; ` +
      `extract ≤ 1.5 × cp: ${met(extract.seconds <= 1.5 * cp.seconds)}; ` +
      `zstd write ≥ 0.9 × zstd: ${met(zstd.seconds / createZstd.seconds >= 0.9)}; ` +
      `RSS ≤ 256 MiB: ${met(peak <= 256 * 1024)}\n`
  )
  out(`round trip sha256 ${roundTripOk ? "equal" : "DIFFERENT"}\n`)
  fs.rmSync(base, { recursive: true, force: true })
  if (!roundTripOk) process.exitCode = 1
}

main().catch((e) => {
  process.stderr.write(`bench failed: ${e instanceof Error ? e.message : String(e)}\n`)
  fs.rmSync(base, { recursive: true, force: true })
  process.exitCode = 1
})
