import { spawn } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { Chunk, Effect, Stream } from "effect"
import * as VmaCli from "../src/VmaCli.js"
import * as VmaInput from "../src/VmaInput.js"
import * as VmaReader from "../src/VmaReader.js"
import * as VmaWriter from "../src/VmaWriter.js"

export const CLUSTER = 65536
export const BLOCK = 4096

export const binPath = fileURLToPath(new URL("../bin/vma.mjs", import.meta.url))

/** A temporary directory removed when the scope closes. */
export const tempDir = Effect.acquireRelease(
  Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "vma-t-"))),
  (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
)

export const sha256 = (bytes: Uint8Array): string => createHash("sha256").update(bytes).digest("hex")

const hashBuffer = Buffer.allocUnsafe(16 << 20)

export const sha256File = (file: string): Effect.Effect<string> =>
  Effect.sync(() => {
    const hash = createHash("sha256")
    const fd = fs.openSync(file, "r")
    try {
      let n: number
      while ((n = fs.readSync(fd, hashBuffer, 0, hashBuffer.length, null)) > 0) hash.update(hashBuffer.subarray(0, n))
    } finally {
      fs.closeSync(fd)
    }
    return hash.digest("hex")
  })

/** A disk image: random data with some all-zero clusters and some zero 4 KiB blocks. */
export const makeImage = (size: number, seed = 1): Uint8Array => {
  const image = new Uint8Array(randomBytes(size))
  let s = seed
  const rand = () => {
    s = (s * 1103515245 + 12345) >>> 0
    return s >>> 16
  }
  for (let c = 0; c * CLUSTER < size; c++) {
    const r = rand() % 10
    if (r < 2) image.fill(0, c * CLUSTER, Math.min(size, (c + 1) * CLUSTER))
    else if (r < 4) {
      const b = rand() % 16
      image.fill(0, c * CLUSTER + b * BLOCK, Math.min(size, c * CLUSTER + (b + 1) * BLOCK))
    }
  }
  return image
}

export const concat = (chunks: Iterable<Uint8Array>): Uint8Array => Buffer.concat([...chunks])

/** Encodes writes into archive bytes in memory (the Stream variant of the writer). */
export const encodeBytes = (ops: ReadonlyArray<VmaWriter.VmaWrite>, options: VmaWriter.VmaArchiveOptions) =>
  Effect.map(Stream.runCollect(VmaWriter.encode(Stream.fromIterable(ops), options)), (c) => concat(Chunk.toArray(c)))

/** Cluster writes of whole images, device by device, in cluster order. */
export const clusterOps = (images: ReadonlyArray<Uint8Array>): Array<VmaWriter.VmaWrite> =>
  images.flatMap((image, i) =>
    Array.from({ length: Math.ceil(image.length / CLUSTER) }, (_, c) => {
      const data = image.subarray(c * CLUSTER, Math.min(image.length, (c + 1) * CLUSTER))
      return VmaWriter.cluster(i + 1, c, data.every((b) => b === 0) ? null : data)
    })
  )

/** Opens archive bytes from memory, in chunks of random sizes. */
export const openBytes = (bytes: Uint8Array, chunk = 100_000) =>
  Effect.flatMap(
    VmaInput.fromStream(
      Stream.fromIterable(Array.from({ length: Math.ceil(bytes.length / chunk) }, (_, i) =>
        bytes.subarray(i * chunk, (i + 1) * chunk)))
    ),
    VmaReader.open
  )

export const verifyBytes = (bytes: Uint8Array) =>
  Effect.scoped(Effect.flatMap(openBytes(bytes), (a) => VmaReader.verify(a)))

/** Byte offsets of the extents of a well-formed archive. */
export const extentOffsets = (bytes: Uint8Array): Array<number> => {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.length)
  const out: Array<number> = []
  let off = dv.getUint32(56)
  while (off + 512 <= bytes.length) {
    out.push(off)
    off += 512 + dv.getUint16(off + 6) * BLOCK
  }
  return out
}

const md5 = (b: Uint8Array) => createHash("md5").update(b).digest()

export const fixHeaderMd5 = (bytes: Uint8Array) => {
  const size = new DataView(bytes.buffer, bytes.byteOffset).getUint32(56)
  bytes.fill(0, 32, 48)
  bytes.set(md5(bytes.subarray(0, size)), 32)
}

export const fixExtentMd5 = (bytes: Uint8Array, offset: number) => {
  bytes.fill(0, offset + 24, offset + 40)
  bytes.set(md5(bytes.subarray(offset, offset + 512)), offset + 24)
}

export interface CliResult {
  readonly code: number
  readonly stdout: string
  readonly stderr: string
  readonly stdoutBytes: Uint8Array
}

/** Runs the CLI in-process, capturing its output. */
export const cli = (...args: Array<string>): Effect.Effect<CliResult> =>
  Effect.suspend(() => {
    const out: Array<Uint8Array> = []
    const err: Array<string> = []
    const io: VmaCli.CliIo = {
      stdout: (d) => Effect.sync(() => void out.push(typeof d === "string" ? Buffer.from(d) : Uint8Array.from(d))),
      stderr: (d) => Effect.sync(() => void err.push(d))
    }
    return Effect.map(VmaCli.run(args, io), (code) => {
      const stdoutBytes = concat(out)
      return { code, stdout: Buffer.from(stdoutBytes).toString(), stderr: err.join(""), stdoutBytes }
    })
  })

/** Runs the `vma` binary as a child process, optionally with a file on stdin. */
export const bin = (args: ReadonlyArray<string>, options: { readonly stdin?: string } = {}) =>
  Effect.promise(() =>
    new Promise<CliResult>((resolve, reject) => {
      const stdin = options.stdin === undefined ? "ignore" : fs.openSync(options.stdin, "r")
      const child = spawn(process.execPath, [binPath, ...args], { stdio: [stdin, "pipe", "pipe"] })
      const out: Array<Buffer> = []
      const err: Array<Buffer> = []
      child.stdout!.on("data", (d: Buffer) => out.push(d))
      child.stderr!.on("data", (d: Buffer) => err.push(d))
      child.on("error", reject)
      child.on("close", (code) => {
        if (typeof stdin === "number") fs.closeSync(stdin)
        const stdoutBytes = Buffer.concat(out)
        const stderr = Buffer.concat(err).toString()
        resolve({ code: code ?? -1, stdout: stdoutBytes.toString(), stderr, stdoutBytes })
      })
    })
  )

/** A sparse file of `size` bytes with data only at the given offsets. */
export const writeSparseFile = (file: string, size: number, blocks: ReadonlyArray<readonly [number, Uint8Array]>) => {
  const fd = fs.openSync(file, "wx")
  fs.ftruncateSync(fd, size)
  for (const [offset, data] of blocks) fs.writeSync(fd, data, 0, data.length, offset)
  fs.closeSync(fd)
}

/** Allocated bytes of a file (sparse files use less than their size). */
export const allocated = (file: string) => fs.statSync(file).blocks * 512
