import { describe, expect, it } from 'vitest';
import { InvalidResponseError } from '../../src/errors.js';
import { checkVectors } from '../../src/provider/validate.js';

describe('checkVectors', () => {
  const finite = [3.4028234663852886e38, -3.4028234663852886e38, 1e-45, -0, 0, 0.5];

  it('passes every finite float32, the extremes and subnormals included', () => {
    const vector = Float32Array.from(finite);
    expect(checkVectors([vector, vector.map((x) => -x)], finite.length)).toHaveLength(2);
  });

  it.for([Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY])(
    'refuses %s wherever it is, naming the vector it is in',
    (bad) => {
      for (let at = 0; at < finite.length; at++) {
        const vector = Float32Array.from(finite);
        vector[at] = bad;
        // A view into a larger buffer, as a decoded response may be.
        const backing = new Float32Array(finite.length + 2);
        backing.set(vector, 1);
        const view = backing.subarray(1, 1 + finite.length);
        const error = (() => {
          try {
            checkVectors([Float32Array.from(finite), view], finite.length);
          } catch (caught) {
            return caught;
          }
        })();
        expect(error).toBeInstanceOf(InvalidResponseError);
        expect((error as InvalidResponseError).message).toBe(
          `embedding 1 has a non-finite value (${bad})`,
        );
      }
    },
  );
});
