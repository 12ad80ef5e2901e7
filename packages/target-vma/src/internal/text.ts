/**
 * C-compatible text formatting used by the `vma` CLI output.
 */

const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
const two = (n: number) => String(n).padStart(2, "0")

/** `ctime(3)` of a time in seconds, in local time, with its trailing newline: `Wed Jun 30 21:49:08 1993\n`. */
export const ctime = (seconds: number): string => {
  const d = new Date(seconds * 1000)
  return `${DAYS[d.getDay()]} ${MONTHS[d.getMonth()]}${String(d.getDate()).padStart(3, " ")} ` +
    `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())} ${d.getFullYear()}\n`
}

/** printf `%.<precision>g`. */
export const formatG = (x: number, precision = 3): string => {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf"
  if (x === 0) return "0"
  const exp = Number(x.toExponential(precision - 1).split("e")[1])
  if (exp < -4 || exp >= precision) {
    const [mantissa, e] = x.toExponential(precision - 1).split("e")
    const m = mantissa!.includes(".") ? mantissa!.replace(/0+$/, "").replace(/\.$/, "") : mantissa!
    const n = Number(e)
    return `${m}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`
  }
  const fixed = x.toFixed(Math.max(0, precision - 1 - exp))
  return fixed.includes(".") ? fixed.replace(/0+$/, "").replace(/\.$/, "") : fixed
}
