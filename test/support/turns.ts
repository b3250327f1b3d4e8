/**
 * Runs `work` and counts the turns this thread's event loop made until it
 * settled: counted, not timed. Work that holds the thread (a synchronous
 * engine, a model) leaves the loop at one turn or so; work done elsewhere
 * leaves it turning thousands of times.
 */
export async function turnsWhile<T>(work: () => Promise<T>): Promise<{ value: T; turns: number }> {
  let turns = 0;
  let settled = false;
  const turn = () => {
    turns++;
    if (!settled) setImmediate(turn);
  };
  setImmediate(turn);
  try {
    const value = await work();
    return { value, turns };
  } finally {
    settled = true;
  }
}
