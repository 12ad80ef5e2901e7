import { assert, describe, it } from "@effect/vitest"
import { Chunk, Effect, Exit, Stream } from "effect"
import * as Crypto from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Path from "node:path"
import * as NbdClient from "../src/NbdClient.js"
import { chunk, CMD_DISC, CMD_READ, fakeContent, fakeServer, offsetData } from "./utils/nbdFakeServer.js"
import {
  freePort,
  hasTool,
  nbdinfoMap,
  nbdkit,
  nbdkitTcp,
  nbdUri,
  qemuNbd,
  randomFile,
  run,
  sha256File,
  spawnServer,
  storageDaemon,
  tempDir
} from "./utils/nbdServers.js"

const hasQemu = hasTool("qemu-img") && hasTool("qemu-io") && hasTool("qemu-nbd") && hasTool("nbdinfo")
const hasQsd = hasQemu && hasTool("qemu-storage-daemon")
const hasNbdkit = hasTool("nbdkit") && hasTool("nbdcopy") && hasTool("nbdinfo")

const MiB = 1024 * 1024
const SIZE = 16 * MiB
const TIMEOUT = 60_000

/**
 * A 16 MiB qcow2 with random data, a pattern, an explicit zero write over data, an unaligned write
 * and unallocated ranges; plus its raw conversion as the reference.
 */
const makeImage = (dir: string, options: { readonly bitmap?: string } = {}) =>
  Effect.gen(function*() {
    const image = Path.join(dir, "disk.qcow2")
    const raw = Path.join(dir, "disk.raw")
    yield* run("qemu-img", ["create", "-q", "-f", "qcow2", image, String(SIZE)])
    const r1 = yield* randomFile(Path.join(dir, "r1"), MiB)
    const r2 = yield* randomFile(Path.join(dir, "r2"), 300000)
    const r3 = yield* randomFile(Path.join(dir, "r3"), 2 * MiB)
    const r4 = yield* randomFile(Path.join(dir, "r4"), 512 * 1024)
    yield* run("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      `write -s ${r1} 0 1M`,
      "-c",
      `write -s ${r2} 3M 300000`,
      "-c",
      "write -P 0x5a 6M 512k",
      "-c",
      `write -s ${r3} 8M 2M`,
      "-c",
      "write -z 8M 1M",
      "-c",
      "write -P 0x33 12345679 1000",
      "-c",
      `write -s ${r4} 15872k 512k`,
      image
    ])
    if (options.bitmap !== undefined) {
      yield* run("qemu-img", ["bitmap", "--add", "--enable", image, options.bitmap])
      yield* run("qemu-io", [
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 100k 4k",
        "-c",
        "write -P 0x22 5M 1M",
        "-c",
        "write -z 12M 64k",
        "-c",
        "write -P 0x44 15M 1",
        image
      ])
      yield* run("qemu-img", ["bitmap", "--disable", image, options.bitmap])
    }
    yield* run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, raw])
    return { image, raw, sha256: yield* sha256File(raw), bytes: Fs.readFileSync(raw) }
  })

interface Collected {
  readonly sha256: string
  readonly chunks: ReadonlyArray<NbdClient.ExportChunk>
  readonly assembled: Buffer
}

/** Runs a chunk stream, checks the chunks are contiguous and in order, hashes the content. */
const collect = <E>(stream: Stream.Stream<NbdClient.ExportChunk, E>, start = 0) =>
  Effect.map(Stream.runCollect(stream), (all): Collected => {
    const chunks = Chunk.toReadonlyArray(all)
    const parts: Array<Buffer> = []
    let at = start
    for (const c of chunks) {
      assert.strictEqual(c.offset, at, "chunks are contiguous and in order")
      assert.isTrue(c.length > 0)
      if (c._tag === "Data") {
        assert.strictEqual(c.data.length, c.length)
        parts.push(Buffer.from(c.data.buffer, c.data.byteOffset, c.data.byteLength))
      } else {
        parts.push(Buffer.alloc(c.length))
      }
      at += c.length
    }
    const assembled = Buffer.concat(parts)
    return { sha256: Crypto.createHash("sha256").update(assembled).digest("hex"), chunks, assembled }
  })

const overlaps = (extents: ReadonlyArray<NbdClient.Extent>, offset: number, length: number, bit: number) =>
  extents.some((e) => (e.flags & bit) !== 0 && e.offset < offset + length && offset < e.offset + e.length)

describe("NbdClient against qemu-nbd", () => {
  it.scopedLive.skipIf(!hasQemu)("handshake reports size, block sizes, flags and contexts", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const client = yield* NbdClient.make({ path: socket, exportName: "disk0" })
      assert.strictEqual(client.info.exportName, "disk0")
      assert.strictEqual(client.info.size, SIZE)
      assert.isTrue(client.info.readOnly)
      assert.isTrue(client.info.structuredReplies)
      assert.isTrue(client.info.advertisedBlockSize)
      assert.strictEqual(client.info.blockSize.minimum, 1)
      assert.strictEqual(client.info.blockSize.maximum, 32 * MiB)
      assert.deepStrictEqual(client.info.metaContexts, ["base:allocation"])
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("streams the export: sha256 equals the raw image, Zero chunks match nbdinfo", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const client = yield* NbdClient.make({ path: socket, exportName: "disk0" })
      const map = yield* nbdinfoMap(nbdUri(socket, "disk0"))
      const result = yield* collect(client.stream({ chunkSize: MiB, concurrency: 4 }))
      assert.strictEqual(result.sha256, img.sha256)
      assert.strictEqual(result.chunks.length, 16)
      for (const c of result.chunks) {
        // a chunk is skipped exactly when nbdinfo reports it all zero
        const allZero = !map.some((e) =>
          (e.flags & NbdClient.StateZero) === 0 && e.offset < c.offset + c.length && c.offset < e.offset + e.length
        )
        assert.strictEqual(c._tag === "Zero", allZero, `chunk at ${c.offset}`)
        assert.notStrictEqual(c._tag, "Clean")
      }
      assert.isTrue(result.chunks.filter((c) => c._tag === "Zero").length >= 8)

      // without block status every chunk is read; all-hole replies still come back as Zero
      const blind = yield* collect(client.stream({ chunkSize: 2 * MiB, concurrency: 8, useAllocation: false }))
      assert.strictEqual(blind.sha256, img.sha256)
      assert.isTrue(blind.chunks.some((c) => c._tag === "Zero"))

      // a sub-range with an unaligned chunk size multiple and an odd length
      const part = yield* collect(
        client.stream({ offset: 3 * MiB, length: 5 * MiB + 123, chunkSize: 768 * 1024 }),
        3 * MiB
      )
      assert.isTrue(part.assembled.equals(img.bytes.subarray(3 * MiB, 8 * MiB + 123)))
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("base:allocation extents equal nbdinfo --map", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const client = yield* NbdClient.make({ path: socket, exportName: "disk0" })
      const expected = yield* nbdinfoMap(nbdUri(socket, "disk0"))
      const extents = yield* client.extents(0, SIZE)
      assert.deepStrictEqual(Array.from(extents.keys()), ["base:allocation"])
      assert.deepStrictEqual(extents.get("base:allocation"), expected)
      assert.isTrue(expected.length >= 5)

      // a sub-range is clipped to exactly the range asked for
      const sub = (yield* client.extents(MiB / 2, 3 * MiB + 7)).get("base:allocation")!
      assert.strictEqual(sub[0].offset, MiB / 2)
      const last = sub[sub.length - 1]
      assert.strictEqual(last.offset + last.length, MiB / 2 + 3 * MiB + 7)

      // a single request starts at the offset asked for
      const one = yield* client.blockStatus(0, SIZE)
      assert.strictEqual(one.get("base:allocation")![0].offset, 0)
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("read returns data pieces and holes; toBuffer and unaligned/split reads match", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const client = yield* NbdClient.make({ path: socket, exportName: "disk0", maxRequestSize: MiB })

      // [512K, 2.5M): data up to 1M, then unallocated
      const r = yield* client.read(MiB / 2, 2 * MiB)
      assert.strictEqual(r.offset, MiB / 2)
      assert.strictEqual(r.length, 2 * MiB)
      const holes = r.pieces.filter((p) => "hole" in p)
      const data = r.pieces.filter((p) => "data" in p)
      assert.isTrue(holes.length >= 1, "QEMU sends NBD_REPLY_TYPE_OFFSET_HOLE for unallocated ranges")
      assert.isTrue(data.length >= 1)
      const holeBytes = holes.reduce((n, p) => n + ("hole" in p ? p.length : 0), 0)
      assert.isTrue(holeBytes >= MiB)
      assert.isTrue(NbdClient.toBuffer(r).equals(img.bytes.subarray(MiB / 2, MiB / 2 + 2 * MiB)))

      // unaligned offset and length
      const odd = yield* client.readBuffer(12345670, 100001)
      assert.isTrue(odd.equals(img.bytes.subarray(12345670, 12345670 + 100001)))

      // whole export in one call: split into 1 MiB requests (maxRequestSize)
      const whole = yield* client.readBuffer(0, SIZE)
      assert.strictEqual(Crypto.createHash("sha256").update(whole).digest("hex"), img.sha256)

      // an all-hole read allocates nothing and toBuffer gives zeroes
      const empty = yield* client.read(13 * MiB, MiB)
      assert.isTrue(empty.pieces.every((p) => "hole" in p))
      assert.isTrue(NbdClient.toBuffer(empty).equals(Buffer.alloc(MiB)))

      // zero-length read, and out-of-range reads are typed errors
      assert.deepStrictEqual((yield* client.read(SIZE, 0)).pieces, [])
      const outOfRange = yield* Effect.flip(client.read(SIZE - 10, 11))
      assert.strictEqual(outOfRange._tag, "NbdRequestError")
      assert.strictEqual(outOfRange._tag === "NbdRequestError" && outOfRange.reason, "OutOfRange")
      const negative = yield* Effect.flip(client.read(-1, 10))
      assert.strictEqual(negative._tag === "NbdRequestError" && negative.reason, "InvalidArgument")
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("unknown export name fails with NbdExportNotFoundError naming it", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const error = yield* Effect.flip(Effect.scoped(NbdClient.make({ path: socket, exportName: "no-such-disk" })))
      assert.strictEqual(error._tag, "NbdExportNotFoundError")
      if (error._tag === "NbdExportNotFoundError") {
        assert.strictEqual(error.exportName, "no-such-disk")
        assert.include(error.message, "no-such-disk")
      }
      // the server is still fine for the right name
      const client = yield* NbdClient.make({ path: socket, exportName: "disk0" })
      assert.strictEqual(client.info.size, SIZE)
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("a dirty bitmap the export lacks fails with NbdOptionError", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const error = yield* Effect.flip(
        Effect.scoped(NbdClient.make({ path: socket, exportName: "disk0", dirtyBitmap: "missing" }))
      )
      assert.strictEqual(error._tag, "NbdOptionError")
      assert.include(error.message, "qemu:dirty-bitmap:missing")
      const client = yield* NbdClient.make({ path: socket, exportName: "disk0" })
      const noCtx = yield* Effect.flip(Stream.runDrain(client.stream({ dirtyBitmap: "missing" })))
      assert.strictEqual(noCtx._tag === "NbdRequestError" && noCtx.reason, "NoMetaContext")
    }), TIMEOUT)
})

describe("NbdClient against qemu-storage-daemon with a dirty bitmap", () => {
  it.scopedLive.skipIf(!hasQsd)("dirty bitmap extents equal nbdinfo; the filtered stream reads only dirty chunks", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir, { bitmap: "b0" })
      const socket = Path.join(dir, "qsd.sock")
      yield* storageDaemon({ image: img.image, socket, exportName: "scsi0", bitmaps: ["b0"] })
      const uri = nbdUri(socket, "scsi0")
      const client = yield* NbdClient.make({ path: socket, exportName: "scsi0", dirtyBitmap: "b0" })
      assert.deepStrictEqual([...client.info.metaContexts].sort(), ["base:allocation", "qemu:dirty-bitmap:b0"])

      const all = yield* client.extents(0, SIZE)
      const dirtyExpected = yield* nbdinfoMap(uri, "qemu:dirty-bitmap:b0")
      assert.deepStrictEqual(all.get("qemu:dirty-bitmap:b0"), dirtyExpected)
      assert.deepStrictEqual(all.get("base:allocation"), yield* nbdinfoMap(uri))
      assert.isTrue(dirtyExpected.filter((e) => e.flags === NbdClient.StateDirty).length >= 3)
      // one context at a time works as well
      const onlyDirty = yield* client.extents(0, SIZE, ["qemu:dirty-bitmap:b0"])
      assert.deepStrictEqual(Array.from(onlyDirty.keys()), ["qemu:dirty-bitmap:b0"])
      assert.deepStrictEqual(onlyDirty.get("qemu:dirty-bitmap:b0"), dirtyExpected)

      // full content still matches
      const full = yield* collect(client.stream({ chunkSize: MiB }))
      assert.strictEqual(full.sha256, img.sha256)

      // incremental: chunks without dirty bits are Clean (not read), the rest is exact
      const inc = yield* collect(client.stream({ chunkSize: MiB, dirtyBitmap: "b0", concurrency: 3 }))
      let clean = 0
      for (const c of inc.chunks) {
        const dirty = overlaps(dirtyExpected, c.offset, c.length, NbdClient.StateDirty)
        assert.strictEqual(c._tag !== "Clean", dirty, `chunk at ${c.offset}`)
        if (c._tag === "Clean") clean++
        const expected = img.bytes.subarray(c.offset, c.offset + c.length)
        if (c._tag === "Data") assert.isTrue(Buffer.from(c.data).equals(expected))
        if (c._tag === "Zero") assert.isTrue(expected.equals(Buffer.alloc(c.length)))
      }
      assert.strictEqual(clean, 16 - 4, "dirty: 0-1M, 5-6M, 12-13M, 15-16M")
    }), TIMEOUT)
})

describe("NbdClient against nbdkit", () => {
  const sparseSource = (dir: string) =>
    Effect.sync(() => {
      const path = Path.join(dir, "src.raw")
      const fd = Fs.openSync(path, "w")
      Fs.ftruncateSync(fd, SIZE)
      Fs.writeSync(fd, Crypto.randomBytes(300000), 0, 300000, 0)
      Fs.writeSync(fd, Buffer.alloc(MiB, 0x77), 0, MiB, 5 * MiB)
      Fs.writeSync(fd, Crypto.randomBytes(3 * 65536 + 100), 0, 3 * 65536 + 100, 9 * MiB)
      Fs.writeSync(fd, Crypto.randomBytes(4096), 0, 4096, SIZE - 4096)
      Fs.closeSync(fd)
      return path
    })

  it.scopedLive.skipIf(!hasNbdkit)("memory plugin filled by nbdcopy: sha256 and extents equal nbdinfo", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "kit.sock")
      const source = yield* sparseSource(dir)
      const log = Path.join(dir, "kit.log")
      yield* nbdkit(socket, ["--filter=log", "memory", String(SIZE), `logfile=${log}`])
      const uri = nbdUri(socket, "")
      yield* run("nbdcopy", [source, uri])
      const client = yield* NbdClient.make({ path: socket })
      assert.strictEqual(client.info.size, SIZE)
      assert.isFalse(client.info.advertisedBlockSize)
      assert.strictEqual(client.info.blockSize.maximum, 32 * MiB)
      const before = Fs.readFileSync(log, "utf8").length
      const result = yield* collect(client.stream({ chunkSize: MiB, concurrency: 6 }))
      assert.strictEqual(result.sha256, yield* sha256File(source))
      const extents = yield* client.extents(0, SIZE)
      const map = yield* nbdinfoMap(uri)
      assert.deepStrictEqual(extents.get("base:allocation"), map)

      // the server saw reads for exactly the chunks holding data (nbdkit's log filter)
      const reads = Array.from(
        Fs.readFileSync(log, "utf8").slice(before).matchAll(/ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g),
        (m) => parseInt(m[1], 16)
      ).sort((a, b) => a - b)
      const dataChunks = result.chunks.filter((c) => c._tag === "Data").map((c) => c.offset)
      assert.deepStrictEqual(reads, dataChunks)
      assert.deepStrictEqual(dataChunks, [0, 5 * MiB, 9 * MiB, 15 * MiB])
      for (const c of result.chunks) {
        const hasData = map.some((e) =>
          (e.flags & NbdClient.StateZero) === 0 && e.offset < c.offset + c.length && c.offset < e.offset + e.length
        )
        assert.strictEqual(c._tag === "Data", hasData, `chunk at ${c.offset}`)
      }
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasNbdkit)("obeys advertised block sizes: aligned, split requests (others rejected)", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "kit.sock")
      const source = yield* sparseSource(dir)
      yield* nbdkit(socket, [
        "--filter=blocksize-policy",
        "memory",
        String(SIZE),
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error"
      ])
      yield* run("nbdcopy", ["--request-size=65536", source, nbdUri(socket, "")])
      const client = yield* NbdClient.make({ path: socket })
      assert.deepStrictEqual(client.info.blockSize, { minimum: 512, preferred: 4096, maximum: 65536 })
      const bytes = Fs.readFileSync(source)
      const odd = yield* client.readBuffer(1001, 3 * MiB + 17)
      assert.isTrue(odd.equals(bytes.subarray(1001, 1001 + 3 * MiB + 17)))
      const result = yield* collect(client.stream({ chunkSize: MiB, useAllocation: false }))
      assert.isTrue(result.assembled.equals(bytes))
      // a stream starting and ending off the 512-byte grid: aligned requests, exact chunks
      for (const useAllocation of [false, true]) {
        const part = yield* collect(
          client.stream({ offset: 1001, length: 3 * MiB + 17, chunkSize: MiB, useAllocation }),
          1001
        )
        assert.isTrue(part.assembled.equals(bytes.subarray(1001, 1001 + 3 * MiB + 17)))
      }
      // chunk sizes must be multiples of the minimum block size
      const bad = yield* Effect.flip(Stream.runDrain(client.stream({ chunkSize: 1000 })))
      assert.strictEqual(bad._tag === "NbdRequestError" && bad.reason, "InvalidArgument")
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasNbdkit)("an error reply becomes NbdCommandError; the connection stays usable", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "kit.sock")
      yield* nbdkit(socket, ["--filter=error", "memory", String(MiB), "error-pread=EIO", "error-pread-rate=100%"])
      const client = yield* NbdClient.make({ path: socket })
      const error = yield* Effect.flip(client.read(4096, 8192))
      assert.strictEqual(error._tag, "NbdCommandError")
      if (error._tag === "NbdCommandError") {
        assert.strictEqual(error.command, "NBD_CMD_READ")
        assert.strictEqual(error.errno, 5)
        assert.strictEqual(error.code, "EIO")
        assert.strictEqual(error.offset, 4096)
        assert.include(error.message, "EIO")
      }
      const streamError = yield* Effect.flip(Stream.runDrain(client.stream({ useAllocation: false })))
      assert.strictEqual(streamError._tag, "NbdCommandError")
      const extents = yield* client.extents(0, MiB)
      assert.strictEqual(extents.get("base:allocation")!.length, 1)
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasNbdkit)("connects over TCP", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const source = yield* sparseSource(dir)
      const port = yield* freePort
      yield* nbdkitTcp(port, ["memory", String(SIZE)])
      yield* run("nbdcopy", [source, `nbd://127.0.0.1:${port}`])
      const client = yield* NbdClient.make({ host: "127.0.0.1", port })
      const result = yield* collect(client.stream({ chunkSize: 4 * MiB }))
      assert.strictEqual(result.sha256, yield* sha256File(source))
    }), TIMEOUT)
})

describe("NbdClient failure handling", () => {
  it.scopedLive("a missing socket fails with NbdConnectError", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const error = yield* Effect.flip(Effect.scoped(NbdClient.make({ path: Path.join(dir, "absent.sock") })))
      assert.strictEqual(error._tag, "NbdConnectError")
      if (error._tag === "NbdConnectError") {
        assert.strictEqual(error.reason, "Connect")
        assert.include(error.message, "absent.sock")
      }
    }), 10_000)

  it.scopedLive("a server that never greets fails with NbdConnectError Timeout", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "mute.sock")
      const sockets: Array<Net.Socket> = []
      yield* Effect.acquireRelease(
        Effect.async<Net.Server>((resume) => {
          const server = Net.createServer((s) => sockets.push(s))
          server.listen(socket, () => resume(Effect.succeed(server)))
        }),
        (server) =>
          Effect.async<void>((resume) => {
            sockets.forEach((s) => s.destroy())
            server.close(() => resume(Effect.void))
          })
      )
      const started = Date.now()
      const error = yield* Effect.flip(Effect.scoped(NbdClient.make({ path: socket, connectTimeout: "300 millis" })))
      assert.strictEqual(error._tag, "NbdConnectError")
      assert.strictEqual(error._tag === "NbdConnectError" && error.reason, "Timeout")
      assert.isBelow(Date.now() - started, 3000)
    }), 10_000)

  it.scopedLive("layer provides the client under its tag and disconnects when released", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "fake.sock")
      const server = yield* fakeServer(socket, {
        size: MiB,
        scenario: (req, conn) => {
          conn.outstanding.shift()
          conn.socket.write(chunk(req.cookie, 1, 1, offsetData(req.offset, fakeContent(req.offset, req.length))))
        }
      })
      const data = yield* Effect.flatMap(NbdClient.NbdClient, (client) => client.readBuffer(1000, 5000)).pipe(
        Effect.provide(NbdClient.layer({ path: socket, exportName: "any" }))
      )
      assert.isTrue(data.equals(fakeContent(1000, 5000)))
      assert.deepStrictEqual(server.connections[0].received, [CMD_READ, CMD_DISC])
    }), 10_000)

  it.scopedLive("a server closing mid-reply fails every pending request with NbdClosedError", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "fake.sock")
      yield* fakeServer(socket, {
        size: MiB,
        scenario: (req, conn) => {
          if (conn.outstanding.length < 3) return
          // half a data chunk for the first request, then hang up
          const first = conn.outstanding[0]
          const full = chunk(first.cookie, 1, 1, offsetData(first.offset, fakeContent(first.offset, first.length)))
          conn.socket.write(full.subarray(0, 20 + 8 + first.length / 2))
          setTimeout(() => conn.socket.destroy(), 20)
        }
      })
      const client = yield* NbdClient.make({ path: socket })
      const exits = yield* Effect.all(
        [client.read(0, 65536), client.read(65536, 65536), client.read(131072, 65536)].map(Effect.exit),
        { concurrency: "unbounded" }
      ).pipe(Effect.timeoutFail({ duration: "5 seconds", onTimeout: () => new Error("hang") }))
      for (const exit of exits) {
        assert.isTrue(Exit.isFailure(exit))
        if (Exit.isFailure(exit)) {
          const error = exit.cause._tag === "Fail" ? exit.cause.error : undefined
          assert.strictEqual(error?._tag, "NbdClosedError")
          assert.strictEqual(error?._tag === "NbdClosedError" && error.reason, "ServerClosed")
        }
      }
      // later requests fail at once
      const after = yield* Effect.flip(client.read(0, 512))
      assert.strictEqual(after._tag, "NbdClosedError")
    }), 10_000)

  it.scopedLive("a malformed reply magic fails with NbdProtocolError", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "fake.sock")
      yield* fakeServer(socket, {
        size: MiB,
        scenario: (_req, conn) => {
          conn.socket.write(Buffer.from("deadbeef000000000000000000000000000000000000", "hex"))
        }
      })
      const client = yield* NbdClient.make({ path: socket })
      const error = yield* Effect.flip(client.read(0, 4096)).pipe(Effect.timeout("5 seconds"))
      assert.strictEqual(error._tag, "NbdProtocolError")
      assert.include(error.message, "deadbeef")
      const again = yield* Effect.flip(client.read(0, 4096))
      assert.strictEqual(again._tag, "NbdProtocolError")
    }), 10_000)

  it.scopedLive("a data chunk outside the request and an unknown cookie are protocol errors", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "fake.sock")
      let mode: "outside" | "cookie" = "outside"
      yield* fakeServer(socket, {
        size: MiB,
        scenario: (req, conn) => {
          conn.outstanding.shift()
          if (mode === "outside") {
            conn.socket.write(chunk(req.cookie, 1, 1, offsetData(req.offset + req.length, Buffer.alloc(16))))
          } else {
            conn.socket.write(chunk(Buffer.alloc(8, 0xee), 1, 0, Buffer.alloc(0)))
          }
        }
      })
      const first = yield* Effect.flip(Effect.flatMap(NbdClient.make({ path: socket }), (c) => c.read(0, 4096)))
      assert.strictEqual(first._tag, "NbdProtocolError")
      assert.include(first.message, "outside the request")
      mode = "cookie"
      const second = yield* Effect.flip(Effect.flatMap(NbdClient.make({ path: socket }), (c) => c.read(0, 4096)))
      assert.strictEqual(second._tag, "NbdProtocolError")
      assert.include(second.message, "unknown cookie")
    }), 10_000)

  it.scopedLive("pipelines up to maxInFlight requests and matches out-of-order replies by cookie", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "fake.sock")
      let maxOutstanding = 0
      const server = yield* fakeServer(socket, {
        size: 4 * MiB,
        scenario: (_req, conn) => {
          maxOutstanding = Math.max(maxOutstanding, conn.outstanding.length)
          // answer only once 8 requests are outstanding, newest first, each split in two chunks
          if (conn.outstanding.length < 8) return
          const batch = conn.outstanding.splice(0, conn.outstanding.length).reverse()
          for (const r of batch) {
            const half = r.length / 2
            conn.socket.write(chunk(r.cookie, 0, 1, offsetData(r.offset + half, fakeContent(r.offset + half, half))))
            conn.socket.write(chunk(r.cookie, 1, 1, offsetData(r.offset, fakeContent(r.offset, half))))
          }
        }
      })
      yield* Effect.scoped(Effect.gen(function*() {
        const client = yield* NbdClient.make({ path: socket, maxInFlight: 8 })
        const offsets = Array.from({ length: 32 }, (_, i) => i * 65536)
        const buffers = yield* Effect.forEach(offsets, (o) => client.readBuffer(o, 65536), {
          concurrency: "unbounded"
        }).pipe(Effect.timeoutFail({ duration: "10 seconds", onTimeout: () => new Error("no pipelining") }))
        offsets.forEach((o, i) => assert.isTrue(buffers[i].equals(fakeContent(o, 65536)), `read at ${o}`))
        assert.strictEqual(maxOutstanding, 8)

        // the chunk stream keeps its output in order while replies arrive out of order
        maxOutstanding = 0
        const result = yield* collect(client.stream({ chunkSize: 128 * 1024, concurrency: 8, useAllocation: false }))
        assert.strictEqual(result.chunks.length, 32)
        assert.isTrue(result.assembled.equals(fakeContent(0, 4 * MiB)))
        assert.strictEqual(maxOutstanding, 8)
      }))
      // closing the scope sent NBD_CMD_DISC
      const received = server.connections[0].received
      assert.strictEqual(received[received.length - 1], CMD_DISC)
      assert.strictEqual(received.filter((t) => t === CMD_READ).length, 64)
    }), 20_000)
})

/** Hashes a stream chunk by chunk (zeros for Zero chunks), releasing each Data chunk `releases` times. */
const hashStream = <E>(stream: Stream.Stream<NbdClient.ExportChunk, E>, releases: number, start = 0) =>
  Effect.gen(function*() {
    const hash = Crypto.createHash("sha256")
    const buffers = new Set<ArrayBufferLike>()
    const tags: Array<string> = []
    let at = start
    yield* Stream.runForEach(stream, (c) =>
      Effect.sync(() => {
        assert.strictEqual(c.offset, at, "chunks are contiguous and in order")
        at += c.length
        tags.push(c._tag)
        if (c._tag === "Data") {
          hash.update(c.data)
          buffers.add(c.data.buffer)
          for (let i = 0; i < releases; i++) c.release()
        } else {
          hash.update(Buffer.alloc(c.length))
        }
      }))
    return { sha256: hash.digest("hex"), buffers: buffers.size, tags, end: at }
  })

/** A fully allocated raw image of random bytes. */
const randomRaw = (dir: string, size: number) =>
  Effect.gen(function*() {
    const raw = yield* randomFile(Path.join(dir, "dense.raw"), size)
    return { raw, sha256: yield* sha256File(raw) }
  })

describe("NbdClient with several connections and reused buffers", () => {
  it.scopedLive.skipIf(!hasNbdkit)("connections: 4 spreads the reads over 4 connections; sha256 and order hold", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "kit.sock")
      const img = yield* randomRaw(dir, SIZE)
      const log = Path.join(dir, "kit.log")
      yield* nbdkit(socket, ["--filter=log", "file", `file=${img.raw}`, `logfile=${log}`])
      const client = yield* NbdClient.make({ path: socket, connections: 4, maxInFlight: 2 })
      assert.strictEqual(client.info.connections, 4)
      assert.strictEqual(client.info.size, SIZE)
      const result = yield* hashStream(client.stream({ chunkSize: MiB, concurrency: 6, useAllocation: false }), 1)
      assert.strictEqual(result.sha256, img.sha256)
      assert.strictEqual(result.end, SIZE)
      assert.deepStrictEqual(result.tags, Array.from({ length: 16 }, () => "Data"))

      // every chunk was read exactly once, and all four connections served reads
      const reads = Array.from(
        Fs.readFileSync(log, "utf8").matchAll(/connection=(\d+) Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g),
        (m) => ({ connection: Number(m[1]), offset: parseInt(m[2], 16), count: parseInt(m[3], 16) })
      )
      assert.deepStrictEqual(
        reads.map((r) => r.offset).sort((a, b) => a - b),
        Array.from({ length: 16 }, (_, i) => i * MiB)
      )
      assert.isTrue(reads.every((r) => r.count === MiB))
      assert.strictEqual(new Set(reads.map((r) => r.connection)).size, 4)

      // plain reads and block status go through the group as well
      const odd = yield* client.readBuffer(MiB - 100, 2 * MiB + 300)
      assert.isTrue(odd.equals(Fs.readFileSync(img.raw).subarray(MiB - 100, 3 * MiB + 200)))
      assert.deepStrictEqual(yield* client.extents(0, SIZE), new Map([["base:allocation", [
        { offset: 0, length: SIZE, flags: 0 }
      ]]]))
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasNbdkit)("reads go out as requests of at most 2 MiB unless maxRequestSize differs", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* randomRaw(dir, SIZE)
      const logged = (log: string) =>
        Array.from(
          Fs.readFileSync(log, "utf8").matchAll(/ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g),
          (m) => ({ offset: parseInt(m[1], 16), count: parseInt(m[2], 16) })
        ).sort((a, b) => a.offset - b.offset)
      for (const [maxRequestSize, expected] of [[undefined, 2 * MiB], [4 * MiB, 4 * MiB], [MiB, MiB]] as const) {
        const socket = Path.join(dir, `kit-${expected}.sock`)
        const log = Path.join(dir, `kit-${expected}.log`)
        yield* nbdkit(socket, ["--filter=log", "file", `file=${img.raw}`, `logfile=${log}`])
        const client = yield* NbdClient.make({
          path: socket,
          ...(maxRequestSize === undefined ? {} : { maxRequestSize })
        })
        const result = yield* hashStream(client.stream({ chunkSize: 4 * MiB, useAllocation: false }), 1)
        assert.strictEqual(result.sha256, img.sha256)
        assert.deepStrictEqual(result.tags, ["Data", "Data", "Data", "Data"])
        // each 4 MiB chunk was split into requests of `expected` bytes, covering the export once
        assert.deepStrictEqual(
          logged(log),
          Array.from({ length: SIZE / expected }, (_, i) => ({ offset: i * expected, count: expected }))
        )
      }
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("qemu-nbd, 3 connections: the same chunks and bytes as one connection", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const one = yield* NbdClient.make({ path: socket, exportName: "disk0" })
      const three = yield* NbdClient.make({ path: socket, exportName: "disk0", connections: 3 })
      assert.strictEqual(three.info.connections, 3)
      assert.isTrue(three.info.canMultiConn, "qemu-nbd advertises multi-conn for read-only exports")
      for (const options of [{ chunkSize: MiB, concurrency: 5 }, { chunkSize: 512 * 1024, useAllocation: false }]) {
        const a = yield* hashStream(one.stream(options), 1)
        const b = yield* hashStream(three.stream(options), 1)
        assert.strictEqual(a.sha256, img.sha256)
        assert.strictEqual(b.sha256, img.sha256)
        assert.deepStrictEqual(b.tags, a.tags)
      }
      assert.deepStrictEqual(yield* three.extents(0, SIZE), yield* one.extents(0, SIZE))
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("released buffers are reused, their holes read as zeros, double release is safe", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* makeImage(dir)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.image, format: "qcow2", socket, exportName: "disk0" })
      const client = yield* NbdClient.make({ path: socket, exportName: "disk0" })
      // every chunk is read (no block status), so chunks with holes land in buffers that held data before
      const options = { chunkSize: MiB, concurrency: 3, useAllocation: false }
      const released = yield* hashStream(client.stream(options), 1)
      assert.strictEqual(released.sha256, img.sha256)
      const data = released.tags.filter((t) => t === "Data").length
      assert.isAtLeast(data, 6)
      assert.isBelow(released.buffers, data, "released buffers come back")
      assert.isAtMost(released.buffers, 3 + 4 + 1)

      // releasing twice must not hand one buffer to two reads: each chunk is checked against the image
      // only when the next Data chunk has arrived, and released (twice) then
      let previous: NbdClient.DataChunk | undefined
      const check = (c: NbdClient.DataChunk) => {
        const expected = img.bytes.subarray(c.offset, c.offset + c.length)
        assert.isTrue(Buffer.from(c.data).equals(expected), `chunk ${c.offset}`)
        c.release()
        c.release()
      }
      for (const concurrency of [2, 4]) {
        yield* Stream.runForEach(client.stream({ ...options, concurrency }), (c) =>
          Effect.sync(() => {
            if (c._tag !== "Data") return
            if (previous !== undefined) check(previous)
            previous = c
          }))
        check(previous!)
        previous = undefined
      }

      // without release every Data chunk keeps its own bytes, even after the stream has ended
      const kept = yield* collect(client.stream(options))
      assert.strictEqual(kept.sha256, img.sha256)
      const buffers = new Set(kept.chunks.flatMap((c) => c._tag === "Data" ? [c.data.buffer] : []))
      assert.strictEqual(buffers.size, data)
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("a stream ended early abandons its reads; the connection stays in sync", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* randomRaw(dir, SIZE)
      const socket = Path.join(dir, "nbd.sock")
      yield* qemuNbd({ image: img.raw, format: "raw", socket, exportName: "d" })
      const bytes = Fs.readFileSync(img.raw)
      for (const connections of [1, 2]) {
        const client = yield* NbdClient.make({ path: socket, exportName: "d", connections })
        for (let round = 0; round < 3; round++) {
          const first = yield* client.stream({ chunkSize: 256 * 1024, concurrency: 16 }).pipe(
            Stream.take(2),
            Stream.runCollect,
            Effect.map(Chunk.toReadonlyArray)
          )
          assert.deepStrictEqual(first.map((c) => c.offset), [0, 256 * 1024])
          const c0 = first[0]
          assert.isTrue(c0._tag === "Data" && Buffer.from(c0.data).equals(bytes.subarray(0, 256 * 1024)))
          // replies to the abandoned reads arrive now; later requests must still match their own replies
          const again = yield* client.readBuffer(5 * MiB + 7, 3 * MiB)
          assert.isTrue(again.equals(bytes.subarray(5 * MiB + 7, 8 * MiB + 7)))
        }
        const full = yield* hashStream(client.stream({ chunkSize: 2 * MiB, concurrency: 4 }), 1)
        assert.strictEqual(full.sha256, img.sha256)
      }
    }), TIMEOUT)

  it.scopedLive.skipIf(!hasQemu)("every connection must be accepted: qemu-nbd --shared=1 times out", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const img = yield* randomRaw(dir, MiB)
      const socket = Path.join(dir, "one.sock")
      yield* spawnServer(
        "qemu-nbd",
        ["--persistent", "--shared=1", `--socket=${socket}`, "--format=raw", "--read-only", img.raw],
        socket
      )
      const error = yield* Effect.flip(
        Effect.scoped(NbdClient.make({ path: socket, connections: 2, connectTimeout: "1 second" }))
      )
      assert.strictEqual(error._tag === "NbdConnectError" && error.reason, "Timeout")
      const invalid = yield* Effect.flip(Effect.scoped(NbdClient.make({ path: socket, connections: 0 })))
      assert.strictEqual(invalid._tag === "NbdRequestError" && invalid.reason, "InvalidArgument")
      // one connection still works once the others are gone
      const client = yield* NbdClient.make({ path: socket })
      assert.strictEqual(client.info.size, MiB)
    }), TIMEOUT)

  it.scopedLive("a slow chunk holds the window: at most `concurrency` chunks from the oldest unconsumed one", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "fake.sock")
      const size = 4 * MiB
      const chunkSize = 128 * 1024
      const concurrency = 5
      const slow = 1
      let maxWhileHeld = -1
      let held: (() => void) | undefined
      type Request = { cookie: Buffer; offset: number; length: number }
      type Conn = { socket: Net.Socket; outstanding: Array<Request> }
      const answer = (conn: Conn, r: Request) => {
        conn.outstanding.splice(conn.outstanding.indexOf(r), 1)
        conn.socket.write(chunk(r.cookie, 1, 1, offsetData(r.offset, fakeContent(r.offset, r.length))))
      }
      const release = () => {
        const answerHeld = held
        held = undefined
        answerHeld?.()
      }
      yield* fakeServer(socket, {
        size,
        scenario: (req, conn) => {
          const index = req.offset / chunkSize
          if (index === slow) {
            // chunk 1 waits until the window is full (plus 300 ms for any excess request), at most 5 s
            held = () => answer(conn, req)
            setTimeout(release, 5000)
            return
          }
          if (held !== undefined) {
            maxWhileHeld = Math.max(maxWhileHeld, index)
            if (index === slow + concurrency - 1) setTimeout(release, 300)
          }
          answer(conn, req)
        }
      })
      const client = yield* NbdClient.make({ path: socket, connections: 2 })
      // a slow consumer: the stream is pulled again while chunk 1 is missing and later ones have arrived
      const result = yield* hashStream(
        client.stream({ chunkSize, concurrency, useAllocation: false }).pipe(
          Stream.tap(() => Effect.sleep("20 millis"))
        ),
        1
      ).pipe(Effect.timeoutFail({ duration: "10 seconds", onTimeout: () => new Error("stalled") }))
      assert.strictEqual(result.sha256, Crypto.createHash("sha256").update(fakeContent(0, size)).digest("hex"))
      // chunk 0 is consumed, chunk 1 waits: chunks 1 .. 1 + concurrency - 1 may be read, no further
      assert.strictEqual(maxWhileHeld, slow + concurrency - 1)
    }), 20_000)

  it.scopedLive("the stream keeps at most `concurrency` reads outstanding over all connections", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const socket = Path.join(dir, "fake.sock")
      const size = 4 * MiB
      const concurrency = 6
      const chunkSize = 128 * 1024
      let maxOutstanding = 0
      let answered = 0
      const server = yield* fakeServer(socket, {
        size,
        scenario: () => {
          const all = server.connections
          const outstanding = all.reduce((n, c) => n + c.outstanding.length, 0)
          maxOutstanding = Math.max(maxOutstanding, outstanding)
          // answer only when the window is full (or the rest of the export is requested), newest first
          if (outstanding < Math.min(concurrency, size / chunkSize - answered)) return
          const batch = all.flatMap((c) => c.outstanding.splice(0).map((r) => ({ r, c }))).reverse()
          for (const { c, r } of batch) {
            answered++
            c.socket.write(chunk(r.cookie, 1, 1, offsetData(r.offset, fakeContent(r.offset, r.length))))
          }
        }
      })
      const client = yield* NbdClient.make({ path: socket, connections: 2, maxInFlight: 16 })
      const result = yield* hashStream(
        client.stream({ chunkSize, concurrency, useAllocation: false }),
        1
      ).pipe(Effect.timeoutFail({ duration: "10 seconds", onTimeout: () => new Error("stalled") }))
      assert.strictEqual(result.end, size)
      assert.strictEqual(result.sha256, Crypto.createHash("sha256").update(fakeContent(0, size)).digest("hex"))
      assert.strictEqual(maxOutstanding, concurrency)
      assert.strictEqual(server.connections.length, 2)
      assert.isTrue(server.connections.every((c) => c.received.includes(CMD_READ)), "both connections read")
    }), 20_000)
})
