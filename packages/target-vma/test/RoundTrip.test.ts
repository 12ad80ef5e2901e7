import * as fs from "node:fs"
import * as path from "node:path"
import { randomBytes } from "node:crypto"
import { assert, describe, it } from "@effect/vitest"
import { Chunk, Effect, Stream } from "effect"
import * as VmaInput from "../src/VmaInput.js"
import * as VmaOutput from "../src/VmaOutput.js"
import * as VmaReader from "../src/VmaReader.js"
import * as VmaWriter from "../src/VmaWriter.js"
import {
  allocated,
  CLUSTER,
  clusterOps,
  extentOffsets,
  makeImage,
  openBytes,
  sha256,
  sha256File,
  tempDir,
  verifyBytes,
  writeSparseFile
} from "./utils.js"

const conf = "name: vm\nmemory: 512\n#qmdump#map:scsi0:drive-scsi0:local:raw:\n"

const shuffle = <A>(xs: Array<A>, seed = 42): Array<A> => {
  let s = seed
  for (let i = xs.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) >>> 0
    const j = (s >>> 8) % (i + 1)
    ;[xs[i], xs[j]] = [xs[j]!, xs[i]!]
  }
  return xs
}

interface Disk {
  readonly name: string
  readonly image: Uint8Array
}

/** Writes the ops to a file with the writer, extracts it with the reader, and compares every disk's sha256. */
const roundTrip = (
  disks: ReadonlyArray<Disk>,
  ops: ReadonlyArray<VmaWriter.VmaWrite>,
  options: { readonly clustersPerExtent?: number } = {}
) =>
  Effect.gen(function*() {
    const dir = yield* tempDir
    const file = path.join(dir, "a.vma")
    const stats = yield* Effect.scoped(Effect.gen(function*() {
      const output = yield* VmaOutput.file(file)
      const writer = yield* VmaWriter.make({
        output,
        configs: [{ name: "qemu-server.conf", data: conf }],
        devices: disks.map((d) => ({ name: d.name, size: d.image.length })),
        clustersPerExtent: options.clustersPerExtent
      })
      for (const op of ops) yield* writer.write(op)
      return yield* writer.finish
    }))
    const result = yield* Effect.scoped(Effect.gen(function*() {
      const archive = yield* VmaReader.open(yield* VmaInput.file(file))
      assert.deepStrictEqual(archive.header.devices.map((d) => [d.id, d.name, d.size]), disks.map((d, i) => [
        i + 1,
        d.name,
        d.image.length
      ]))
      return yield* VmaReader.extract(archive, { directory: path.join(dir, "x") })
    }))
    for (const disk of disks) {
      const extracted = path.join(dir, "x", `disk-${disk.name}.raw`)
      assert.strictEqual(fs.statSync(extracted).size, disk.image.length)
      assert.strictEqual(yield* sha256File(extracted), sha256(disk.image), disk.name)
    }
    assert.strictEqual(fs.readFileSync(path.join(dir, "x", "qemu-server.conf"), "utf8"), conf)
    assert.deepStrictEqual(fs.readdirSync(path.join(dir, "x")).sort(), [
      ...disks.map((d) => `disk-${d.name}.raw`),
      "qemu-server.conf"
    ].sort())
    return { file, dir, stats, result, bytes: fs.readFileSync(file) }
  })

describe("round trips through the writer and the reader", () => {
  it.scopedLive("several devices, clusters in random order and interleaved across devices", () =>
    Effect.gen(function*() {
      const disks = [
        { name: "drive-scsi0", image: makeImage(5 * 1024 * 1024, 1) },
        { name: "drive-virtio1", image: makeImage(58 * CLUSTER, 2) },
        { name: "drive-efidisk0", image: makeImage(200_000, 3) }
      ]
      const ops = shuffle(clusterOps(disks.map((d) => d.image)))
      const { bytes, stats } = yield* roundTrip(disks, ops)
      assert.deepStrictEqual(stats.devices.map((d) => d.transferred), disks.map((d) => d.image.length))
      // clusters of different devices share extents
      const mixed = extentOffsets(bytes).some((off) => {
        const devs = new Set<number>()
        for (let s = 0; s < 59; s++) if (bytes[off + 40 + 8 * s + 3]! !== 0) devs.add(bytes[off + 40 + 8 * s + 3]!)
        return devs.size > 1
      })
      assert.isTrue(mixed)
    }))

  it.scopedLive("58 clusters per extent (QEMU) and 59 (the format's limit), at extent boundaries", () =>
    Effect.gen(function*() {
      for (const [clusters, per, extents] of [[58, 58, 1], [59, 58, 2], [59, 59, 1], [117, 59, 2], [118, 59, 2]]) {
        const disk = { name: "drive-scsi0", image: makeImage(clusters! * CLUSTER, clusters!) }
        const { bytes } = yield* roundTrip([disk], clusterOps([disk.image]), { clustersPerExtent: per! })
        assert.strictEqual(extentOffsets(bytes).length, extents, `${clusters} clusters, ${per} per extent`)
      }
    }))

  it.scopedLive("unaligned device size (200 000 bytes) written in one call", () =>
    Effect.gen(function*() {
      const disk = { name: "drive-scsi0", image: makeImage(200_000, 5) }
      yield* roundTrip([disk], [VmaWriter.data(1, 0, disk.image)])
    }))

  it.scopedLive("diskless archive: configs only", () =>
    Effect.gen(function*() {
      const { bytes, result } = yield* roundTrip([], [])
      assert.strictEqual(bytes.length, new DataView(bytes.buffer, bytes.byteOffset).getUint32(56) + 512)
      assert.strictEqual(result.stats.extents, 1)
      assert.strictEqual(result.stats.clusters, 0)
    }))

  it.scopedLive("sparse disk with a few scattered blocks: holes written as zeros, extracted file sparse", () =>
    Effect.gen(function*() {
      const size = 64 * 1024 * 1024
      const image = new Uint8Array(size)
      const blocks = [0, 4096 * 17, 5 * 1024 * 1024 + 8192, 40 * 1024 * 1024, size - 4096]
      for (const b of blocks) image.set(randomBytes(4096), b)
      // Like the engine: data for clusters with data, writeZeros for the holes between them.
      const ops: Array<VmaWriter.VmaWrite> = []
      let at = 0
      for (const b of blocks) {
        const c = Math.floor(b / CLUSTER) * CLUSTER
        if (c < at) continue
        if (c > at) ops.push(VmaWriter.zeros(1, at, c - at))
        ops.push(VmaWriter.data(1, c, image.subarray(c, c + CLUSTER)))
        at = c + CLUSTER
      }
      if (at < size) ops.push(VmaWriter.zeros(1, at, size - at))
      const { bytes, dir } = yield* roundTrip([{ name: "drive-scsi0", image }], ops)
      assert.isBelow(bytes.length, 13_000 + 1024 * 512 / 58 * 2 + 5 * 4096 + 20 * 512)
      assert.isBelow(allocated(path.join(dir, "x", "disk-drive-scsi0.raw")), 1024 * 1024)
    }))

  it.scopedLive("1 GiB sparse disk: holes are never materialised, extraction stays sparse", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const size = 1024 * 1024 * 1024
      const data = [0, 333 * CLUSTER + 4096, 8191 * CLUSTER, size - CLUSTER].map((o) => [o, randomBytes(4096)] as const)
      const source = path.join(dir, "source.raw")
      writeSparseFile(source, size, data)
      const file = path.join(dir, "big.vma")
      yield* Effect.scoped(Effect.gen(function*() {
        const writer = yield* VmaWriter.make({ output: yield* VmaOutput.file(file), devices: [{ name: "d", size }] })
        let at = 0
        for (const [offset, block] of data) {
          const c = Math.floor(offset / CLUSTER) * CLUSTER
          if (c > at) yield* writer.writeZeros(1, at, c - at)
          const cluster = new Uint8Array(CLUSTER)
          cluster.set(block, offset - c)
          yield* writer.writeCluster(1, c / CLUSTER, cluster)
          at = c + CLUSTER
        }
        if (at < size) yield* writer.writeZeros(1, at, size - at)
        yield* writer.finish
      }))
      assert.isBelow(fs.statSync(file).size, 200_000, "16 384 mask-0 entries and 4 blocks")
      yield* Effect.scoped(
        Effect.flatMap(Effect.flatMap(VmaInput.file(file), VmaReader.open), (archive) =>
          VmaReader.extract(archive, { directory: path.join(dir, "x") }))
      )
      const extracted = path.join(dir, "x", "disk-d.raw")
      assert.isBelow(allocated(extracted), 1024 * 1024)
      assert.strictEqual(yield* sha256File(extracted), yield* sha256File(source))
    }), 60_000)

  it.scopedLive("Sink and Stream variants; reading from a Stream in arbitrary chunks", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const image = makeImage(3 * 1024 * 1024 + 12_345, 11)
      const ops = shuffle(clusterOps([image]), 7)
      const options = {
        uuid: "6b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9",
        ctime: 1,
        devices: [{ name: "a", size: image.length }]
      }
      const file = path.join(dir, "sink.vma")
      yield* Effect.scoped(Effect.flatMap(VmaOutput.file(file), (output) =>
        Stream.run(Stream.fromIterable(ops), VmaWriter.sink({ ...options, output }))))
      const stream = VmaWriter.encode(Stream.fromIterable(ops), options)
      const encoded = Buffer.concat(Chunk.toArray(yield* Stream.runCollect(stream)))
      assert.deepStrictEqual(fs.readFileSync(file), encoded, "Sink to a file and Stream give the same bytes")
      for (const chunk of [97, 511, 4096, 1_000_003]) {
        const stats = yield* Effect.scoped(Effect.flatMap(openBytes(encoded, chunk), (a) => VmaReader.verify(a)))
        assert.strictEqual(stats.clusters, Math.ceil(image.length / CLUSTER))
      }
      // The extents stream hands out each cluster's stored blocks.
      const restored = new Uint8Array(Math.ceil(image.length / CLUSTER) * CLUSTER)
      yield* Effect.scoped(Effect.gen(function*() {
        const archive = yield* openBytes(encoded, 777)
        yield* Stream.runForEach(archive.extents, (extent) =>
          Effect.sync(() => {
            for (const c of extent.clusters) {
              let at = 0
              for (let j = 0; j < 16; j++) {
                if ((c.mask & (1 << j)) === 0) continue
                restored.set(c.data.subarray(at, at + 4096), c.cluster * CLUSTER + j * 4096)
                at += 4096
              }
            }
          }))
      }))
      assert.deepStrictEqual(restored.subarray(0, image.length), image)
      assert.strictEqual((yield* verifyBytes(encoded)).clusters, Math.ceil(image.length / CLUSTER))
    }))
})
