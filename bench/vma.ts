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
 * Each step runs BENCH_REPEAT times (default 3) with dirty pages flushed before each run; the median time and
 * the largest peak RSS are kept. Ratios are given twice: for whole commands (Node startup included, as the
 * issue compares `vma` with `cp`/`zstd` commands) and with the median `vma list` time (startup) subtracted.
 */
import { spawn } from "node:child_process"
import { createHash, randomFillSync } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { pipeline } from "node:stream/promises"
import { fileURLToPath } from "node:url"
import { parseSize } from "./lib/numbers.js"
import { peakRssKiB } from "./lib/proc.js"

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
// BENCH_VMA_BIN: another `vma` entry point (e.g. an older build) to compare under the same conditions.
const vmaBin = process.env.BENCH_VMA_BIN ?? path.join(root, "packages/target-vma/bin/vma.mjs")


const argSize = process.argv.indexOf("--size")
const size = parseSize(argSize >= 0 ? process.argv[argSize + 1] ?? "1G" : "1G", 65536)
const base = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), "vma-bench-"))
const out = (s: string) => process.stdout.write(s)

interface Run {
  readonly seconds: number
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

/** Runs a step `times` times (cleaning up before each run) and keeps the median time and the largest RSS. */
const median = async (times: number, cleanup: () => void, step: () => Promise<Run>): Promise<Run> => {
  const runs: Array<Run> = []
  for (let i = 0; i < times; i++) {
    cleanup()
    runs.push(await step())
  }
  const sorted = [...runs].sort((a, b) => a.seconds - b.seconds)
  const mid = sorted.length >> 1
  const seconds = sorted.length % 2 === 1 ? sorted[mid]!.seconds : (sorted[mid - 1]!.seconds + sorted[mid]!.seconds) / 2
  return { ...sorted[mid]!, seconds, peakRssKiB: Math.max(...runs.map((r) => r.peakRssKiB)) }
}

const rm = (...files: Array<string>) => () => {
  for (const f of files) fs.rmSync(f, { recursive: true, force: true })
}

const main = async () => {
  const repeat = Number(process.env.BENCH_REPEAT ?? 3)
  out(`vma: ${vmaBin}\n`)
  out(`VMA benchmark: disk ${mib(size)} MiB (~90% random, ~10% holes) in ${base}, median of ${repeat} runs\n`)
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
  const startup = await median(repeat, rm(listOut), () => vma(["list", tiny], { stdout: listOut }))

  const copy = path.join(base, "disk.cp")
  const cp = await median(repeat, rm(copy), () => must("cp", () => run("cp", [disk, copy])))
  rm(copy)()

  const archive = path.join(base, "a.vma")
  const create = await median(repeat, rm(archive), () => vma(["create", archive, "-c", conf, ...device]))
  const vmaBytes = fs.statSync(archive).size

  const extractDir = path.join(base, "x")
  const extract = await median(repeat, rm(extractDir), () => vma(["extract", archive, extractDir]))
  // Correctness of the round trip (not timed).
  const [a, b] = await Promise.all([sha256(disk), sha256(path.join(extractDir, "disk-drive-scsi0.raw"))])
  const ok = a === b
  rm(extractDir)()

  const ref = path.join(base, "ref.zst")
  const zstd = await median(repeat, rm(ref), () =>
    must("zstd", () => run("zstd", ["-1", "-T0", "-q", "-c", archive], { stdout: ref })))
  rm(ref)()
  const zArchive = path.join(base, "a.vma.zst")
  // zstd's -T0 means one thread per core; vzdump's `zstd: 0` would mean half of them.
  const zstdOptions = ["--zstd-level", "1", "--zstd", String(os.availableParallelism())]
  const createZstd = await median(
    repeat,
    rm(zArchive),
    () => vma(["create", zArchive, ...zstdOptions, "-c", conf, ...device])
  )
  const zBytes = fs.statSync(zArchive).size
  const verifyZstd = await median(repeat, () => {}, () => vma(["verify", "-"], { stdin: zArchive }))

  // The alternative compressor: the same stream piped to a `zstd` process (exec: output), for the choice.
  const piped = path.join(base, "piped.vma.zst")
  const threads = os.availableParallelism()
  const createPiped = await median(
    repeat,
    rm(piped),
    () => vma(["create", `exec:zstd -1 --threads=${threads} -q -c > ${piped}`, "-c", conf, ...device])
  )
  const vsCp = (r: Run) => `${fmt(r.seconds / cp.seconds)} × cp`
  const vsZstd = (seconds: number) => `${fmt(zstd.seconds / seconds)} × zstd throughput`
  const rows: Array<[string, number, string, number | undefined]> = [
    ["cp disk", cp.seconds, "1.00 × cp", undefined],
    ["vma create (uncompressed)", create.seconds, vsCp(create), create.peakRssKiB],
    ["vma extract", extract.seconds, vsCp(extract), extract.peakRssKiB],
    ["zstd -1 -T0 over a.vma", zstd.seconds, "1.00 × zstd throughput", undefined],
    ["vma create .vma.zst (level 1, T0)", createZstd.seconds, vsZstd(createZstd.seconds), createZstd.peakRssKiB],
    ["vma verify - < a.vma.zst", verifyZstd.seconds, vsCp(verifyZstd), verifyZstd.peakRssKiB],
    ["vma create | zstd process", createPiped.seconds, vsZstd(createPiped.seconds), createPiped.peakRssKiB],
    ["vma list (CLI startup)", startup.seconds, "", startup.peakRssKiB]
  ]
  out(`VMA stream: ${fmt(mib(vmaBytes), 1)} MiB; .vma.zst: ${fmt(mib(zBytes), 1)} MiB\n\n`)
  out(`${"step".padEnd(36)} ${"seconds".padStart(8)} ${"MiB/s".padStart(8)}  ${"ratio".padEnd(26)} peak RSS\n`)
  for (const [name, seconds, ratio, rss] of rows) {
    const rssText = rss === undefined ? "" : `${fmt(rss / 1024, 0)} MiB`
    out(
      `${name.padEnd(36)} ${fmt(seconds).padStart(8)} ${fmt(mib(size) / seconds, 0).padStart(8)}  ${
        ratio.padEnd(26)
      } ${rssText}\n`
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
  out(`round trip sha256 ${ok ? "equal" : "DIFFERENT"}\n`)
  fs.rmSync(base, { recursive: true, force: true })
  if (!ok) process.exitCode = 1
}

main().catch((e) => {
  process.stderr.write(`bench failed: ${e instanceof Error ? e.message : String(e)}\n`)
  fs.rmSync(base, { recursive: true, force: true })
  process.exitCode = 1
})
