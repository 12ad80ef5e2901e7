/**
 * One bit per cluster, allocated in 128 KiB pages on first use, so a header declaring huge devices costs
 * memory only for clusters actually seen.
 */
const PAGE_BITS = 2 ** 20
const PAGE_BYTES = PAGE_BITS / 8

export class ClusterBitmap {
  private readonly pages: Array<Uint8Array | undefined> = []
  /** Number of distinct clusters set. */
  count = 0

  constructor(readonly clusters: number) {}

  has(n: number): boolean {
    const page = this.pages[Math.floor(n / PAGE_BITS)]
    if (page === undefined) return false
    const bit = n % PAGE_BITS
    return (page[bit >>> 3]! & (1 << (bit & 7))) !== 0
  }

  /** Sets bit `n`; returns false if it was already set. */
  set(n: number): boolean {
    const p = Math.floor(n / PAGE_BITS)
    let page = this.pages[p]
    if (page === undefined) {
      page = new Uint8Array(PAGE_BYTES)
      this.pages[p] = page
    }
    const bit = n % PAGE_BITS
    const mask = 1 << (bit & 7)
    if ((page[bit >>> 3]! & mask) !== 0) return false
    page[bit >>> 3] = page[bit >>> 3]! | mask
    this.count++
    return true
  }

  get complete(): boolean {
    return this.count === this.clusters
  }

  /** The first cluster not set, or -1. */
  firstMissing(): number {
    for (let n = 0; n < this.clusters; n++) {
      const page = this.pages[Math.floor(n / PAGE_BITS)]
      if (page === undefined) return n
      const bit = n % PAGE_BITS
      if (page[bit >>> 3] === 0xff && (bit & 7) === 0 && n + 8 <= this.clusters) {
        n += 7
        continue
      }
      if ((page[bit >>> 3]! & (1 << (bit & 7))) === 0) return n
    }
    return -1
  }
}
