//! The conv kernels against plain loops over ONNX-order weights (NHWC, exact channel counts):
//! float within 1e-4 relative, int8 bit for bit.
use super::*;
use crate::round_even;

/// A deterministic pseudo-random stream in [−1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
    fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n)
            .map(|_| (self.next() * 127.0).round() as i8)
            .collect()
    }
}

/// A tensor of the reference: `h × w × c`, NHWC, no padding.
#[derive(Clone, Debug)]
struct T {
    h: usize,
    w: usize,
    c: usize,
    v: Vec<f32>,
}

fn quant_ref(x: f32, s: f32, z: i32) -> f32 {
    // Centred int8, as the engine holds it.
    (round_even(x / s) + z as f32).clamp(-128.0, 127.0) - z as f32
}

fn act_ref(a: &Activation, v: f32, c: usize) -> f32 {
    match a {
        Activation::Identity => v,
        Activation::Relu => v.max(0.0),
        Activation::Clip(lo, hi) => v.max(*lo).min(*hi),
        Activation::PRelu(s) => {
            let k = if s.len() == 1 { s[0] } else { s[c] };
            if v < 0.0 {
                v * k
            } else {
                v
            }
        }
    }
}

/// Runs `g` with plain loops (i64 sums for the int8 convs).
fn reference(g: &ConvGraph, input: &[f32]) -> Vec<Vec<f32>> {
    let i0 = &g.tensors[0];
    let mut ts: Vec<Option<T>> = vec![None; g.tensors.len()];
    ts[0] = Some(T {
        h: i0.h,
        w: i0.w,
        c: i0.c,
        v: input.to_vec(),
    });
    // Aliased (channel padded) tensors: materialise on first read.
    let get = |ts: &Vec<Option<T>>, i: usize| -> T {
        if let Some(t) = &ts[i] {
            return t.clone();
        }
        let info = &g.tensors[i];
        // Find the source sharing the buffer.
        let src = (0..i)
            .rev()
            .find(|&j| g.tensors[j].buf == info.buf && ts[j].is_some())
            .expect("alias source");
        let s = ts[src].clone().unwrap();
        let mut v = vec![0.0; s.h * s.w * info.c];
        for p in 0..s.h * s.w {
            v[p * info.c..p * info.c + s.c].copy_from_slice(&s.v[p * s.c..(p + 1) * s.c]);
        }
        T {
            h: s.h,
            w: s.w,
            c: info.c,
            v,
        }
    };
    for op in &g.ops {
        match op {
            Op::Conv {
                x,
                y,
                shape: s,
                weights,
                epi,
            } => {
                let xt = get(&ts, *x);
                let yi = &g.tensors[*y];
                let [kh, kw] = s.kernel;
                let per = s.per_output();
                let mut v = vec![0.0; yi.h * yi.w * yi.c];
                for oy in 0..yi.h {
                    for ox in 0..yi.w {
                        for co in 0..yi.c {
                            let mut accf = 0.0f64;
                            let mut acci = 0i64;
                            let cins: Vec<usize> = if s.depthwise {
                                vec![co]
                            } else {
                                (0..s.in_channels).collect()
                            };
                            for (k, &ci) in cins.iter().enumerate() {
                                for ky in 0..kh {
                                    for kx in 0..kw {
                                        let iy =
                                            (oy * s.stride[0] + ky) as isize - s.pads[0] as isize;
                                        let ix =
                                            (ox * s.stride[1] + kx) as isize - s.pads[1] as isize;
                                        if iy < 0
                                            || ix < 0
                                            || iy >= xt.h as isize
                                            || ix >= xt.w as isize
                                        {
                                            continue;
                                        }
                                        let xv =
                                            xt.v[(iy as usize * xt.w + ix as usize) * xt.c + ci];
                                        let wi = co * per + k * kh * kw + ky * kw + kx;
                                        match weights {
                                            ConvWeights::F32 { weight, .. } => {
                                                accf += f64::from(weight[wi]) * f64::from(xv)
                                            }
                                            ConvWeights::Int8 { weight, .. } => {
                                                acci += i64::from(weight[wi]) * xv as i64
                                            }
                                        }
                                    }
                                }
                            }
                            let pix = oy * yi.w + ox;
                            let mut r = match weights {
                                ConvWeights::F32 { bias, .. } => {
                                    (accf + f64::from(bias[co])) as f32
                                }
                                ConvWeights::Int8 {
                                    weight_scale,
                                    bias,
                                    out_scale,
                                    out_zero,
                                    ..
                                } => {
                                    let (sx, _) = g.tensors[*x].quant.unwrap();
                                    let m = sx * weight_scale[co] / out_scale;
                                    let q = quant_ref(
                                        (acci + i64::from(bias[co])) as f32 * m,
                                        1.0,
                                        i32::from(*out_zero),
                                    );
                                    if epi.dequantize {
                                        q * out_scale
                                    } else {
                                        q
                                    }
                                }
                            };
                            if let Some(a) = epi.add {
                                r += get(&ts, a.0).v[pix * yi.c + co];
                            }
                            v[pix * yi.c + co] = act_ref(&epi.act, r, co);
                        }
                    }
                }
                ts[*y] = Some(T {
                    h: yi.h,
                    w: yi.w,
                    c: yi.c,
                    v,
                });
            }
            Op::Quantize { x, y } => {
                let mut t = get(&ts, *x);
                let (s, z) = g.tensors[*y].quant.unwrap();
                t.v.iter_mut().for_each(|v| *v = quant_ref(*v, s, z));
                ts[*y] = Some(t);
            }
            Op::Dequantize { x, y } => {
                let mut t = get(&ts, *x);
                let (s, _) = g.tensors[*x].quant.unwrap();
                t.v.iter_mut().for_each(|v| *v *= s);
                ts[*y] = Some(t);
            }
            Op::Add { a, b, y, act } => {
                let (mut t, b) = (get(&ts, *a), get(&ts, *b));
                let c = t.c;
                for (i, (v, w)) in t.v.iter_mut().zip(&b.v).enumerate() {
                    *v = act_ref(act, *v + w, i % c);
                }
                ts[*y] = Some(t);
            }
            Op::Act { x, y, act } => {
                let mut t = get(&ts, *x);
                let c = t.c;
                for (i, v) in t.v.iter_mut().enumerate() {
                    *v = act_ref(act, *v, i % c);
                }
                ts[*y] = Some(t);
            }
            Op::MaxPool {
                x,
                y,
                kernel,
                stride,
                pads,
            } => {
                let xt = get(&ts, *x);
                let yi = &g.tensors[*y];
                let mut v = vec![f32::NEG_INFINITY; yi.h * yi.w * yi.c];
                for oy in 0..yi.h {
                    for ox in 0..yi.w {
                        for ky in 0..kernel[0] {
                            for kx in 0..kernel[1] {
                                let iy = (oy * stride[0] + ky) as isize - pads[0] as isize;
                                let ix = (ox * stride[1] + kx) as isize - pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= xt.h as isize || ix >= xt.w as isize {
                                    continue;
                                }
                                for c in 0..yi.c {
                                    let d = &mut v[(oy * yi.w + ox) * yi.c + c];
                                    *d = d.max(xt.v[(iy as usize * xt.w + ix as usize) * xt.c + c]);
                                }
                            }
                        }
                    }
                }
                ts[*y] = Some(T {
                    h: yi.h,
                    w: yi.w,
                    c: yi.c,
                    v,
                });
            }
            Op::Widen { x, y } => {
                let xt = get(&ts, *x);
                let c = g.tensors[*y].c;
                let mut v = vec![0.0; xt.h * xt.w * c];
                for p in 0..xt.h * xt.w {
                    v[p * c..p * c + xt.c].copy_from_slice(&xt.v[p * xt.c..(p + 1) * xt.c]);
                }
                ts[*y] = Some(T {
                    h: xt.h,
                    w: xt.w,
                    c,
                    v,
                });
            }
        }
    }
    g.outputs.iter().map(|&o| get(&ts, o).v).collect()
}

fn shape(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pads: [usize; 4],
    dw: bool,
) -> ConvShape {
    ConvShape {
        in_channels: cin,
        out_channels: cout,
        kernel: [k, k],
        stride: [stride, stride],
        pads,
        depthwise: dw,
    }
}

fn float_conv(r: &mut Rng, s: &ConvShape) -> ConvWeights {
    ConvWeights::F32 {
        weight: r.vec(s.out_channels * s.per_output(), 0.5),
        bias: r.vec(s.out_channels, 0.2),
    }
}

fn int8_conv(r: &mut Rng, s: &ConvShape, out_scale: f32, out_zero: i8) -> ConvWeights {
    ConvWeights::Int8 {
        weight: r.i8s(s.out_channels * s.per_output()),
        weight_scale: (0..s.out_channels)
            .map(|_| 0.002 + 0.002 * r.next().abs())
            .collect(),
        bias: (0..s.out_channels)
            .map(|_| (r.next() * 3000.0) as i32)
            .collect(),
        out_scale,
        out_zero,
    }
}

/// A BlazeFace-like block structure: stem conv 5×5/2, depthwise + pointwise with a residual
/// through a channel padding, max pool, stride-2 depthwise, PRelu and Clip, odd sizes.
fn float_graph(r: &mut Rng) -> ConvGraph {
    let (mut g, x) = ConvGraph::new(19, 17, 3);
    let a = g
        .conv(
            x,
            shape(3, 20, 5, 2, [1, 1, 2, 2], false),
            float_conv(r, &shape(3, 20, 5, 2, [1, 1, 2, 2], false)),
            Epilogue {
                act: Activation::Relu,
                ..Default::default()
            },
        )
        .unwrap();
    let s = shape(20, 20, 3, 1, [1, 1, 1, 1], true);
    let d = g
        .conv(a, s.clone(), float_conv(r, &s), Epilogue::default())
        .unwrap();
    let s = shape(20, 36, 1, 1, [0; 4], false);
    let padded = g.pad_channels(a, 36).unwrap();
    let p = g
        .conv(
            d,
            s.clone(),
            float_conv(r, &s),
            Epilogue {
                add: Some(padded),
                act: Activation::Relu,
                ..Default::default()
            },
        )
        .unwrap();
    let m = g.max_pool(p, [2, 2], [2, 2], [0; 4]).unwrap();
    let s = shape(36, 36, 3, 2, [0, 0, 1, 1], true);
    let d2 = g
        .conv(p, s.clone(), float_conv(r, &s), Epilogue::default())
        .unwrap();
    let s = shape(36, 36, 1, 1, [0; 4], false);
    let slopes = r.vec(36, 0.3);
    let p2 = g
        .conv(
            d2,
            s.clone(),
            float_conv(r, &s),
            Epilogue {
                add: Some(m),
                act: Activation::PRelu(slopes),
                ..Default::default()
            },
        )
        .unwrap();
    let c = g.activation(p2, Activation::Clip(-0.5, 0.5)).unwrap();
    let s = shape(36, 6, 1, 1, [0; 4], false);
    let head = g
        .conv(c, s.clone(), float_conv(r, &s), Epilogue::default())
        .unwrap();
    let s = shape(36, 5, 3, 1, [1, 1, 1, 1], false);
    let head2 = g
        .conv(p2, s.clone(), float_conv(r, &s), Epilogue::default())
        .unwrap();
    let sum = g.add(c, p2, Activation::Identity).unwrap();
    g.output(head).unwrap();
    g.output(head2).unwrap();
    g.output(sum).unwrap();
    g
}

#[test]
fn float_graph_matches_plain_loops() {
    let mut r = Rng(7);
    let g = float_graph(&mut r);
    let input = r.vec(19 * 17 * 3, 1.0);
    let want = reference(&g, &input);
    let net = ConvNet::new(g).unwrap();
    for _ in 0..2 {
        // Twice: buffers are reused between runs.
        let got = net.run(&input).unwrap();
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "output {k}");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "output {k}[{i}]: {a} vs {b}"
                );
            }
        }
    }
    assert_eq!(net.output_shapes(), vec![(4, 4, 6), (4, 4, 5), (4, 4, 36)]);
}

/// The int8 form of the same structure, as `hearth_compress::qconv` exports it: quantize →
/// int8 depthwise (int8 out) → int8 pointwise (dequantized, + residual, ReLU) …
#[test]
fn int8_graph_is_bit_exact() {
    let mut r = Rng(11);
    let (mut g, x) = ConvGraph::new(18, 21, 3);
    let q = g.quantize(x, 0.008, -3).unwrap();
    let s = shape(3, 24, 5, 2, [1, 1, 2, 2], false);
    let w = int8_conv(&mut r, &s, 0.05, 5);
    let a = g
        .conv(
            q,
            s,
            w,
            Epilogue {
                dequantize: true,
                act: Activation::Relu,
                ..Default::default()
            },
        )
        .unwrap();
    let aq = g.quantize(a, 0.03, -128).unwrap();
    let s = shape(24, 24, 3, 1, [1, 1, 1, 1], true);
    let w = int8_conv(&mut r, &s, 0.04, 2);
    let d = g.conv(aq, s, w, Epilogue::default()).unwrap();
    assert!(g.is_int8(d));
    let s = shape(24, 40, 1, 1, [0; 4], false);
    let w = int8_conv(&mut r, &s, 0.06, -7);
    let padded = g.pad_channels(a, 40).unwrap();
    let p = g
        .conv(
            d,
            s,
            w,
            Epilogue {
                dequantize: true,
                add: Some(padded),
                act: Activation::Relu,
            },
        )
        .unwrap();
    let s = shape(40, 40, 3, 2, [0, 0, 1, 1], true);
    let pq = g.quantize(p, 0.05, -128).unwrap();
    let w = int8_conv(&mut r, &s, 0.05, 0);
    let d2 = g.conv(pq, s, w, Epilogue::default()).unwrap();
    let out = g.dequantize(d2).unwrap();
    g.output(out).unwrap();
    g.output(p).unwrap();
    let input = r.vec(18 * 21 * 3, 1.0);
    let want = reference(&g, &input);
    let net = ConvNet::new(g).unwrap();
    assert_eq!(net.conv_counts(), (4, 4));
    let got = net.run(&input).unwrap();
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "int8 output {k} differs from the integer reference");
    }
    // Not trivially equal: the outputs take many distinct values.
    let mut distinct = got[0].clone();
    distinct.sort_by(f32::total_cmp);
    distinct.dedup();
    assert!(distinct.len() > 20, "{} distinct values", distinct.len());
}

#[test]
fn graphs_are_checked() {
    let mut r = Rng(3);
    let (mut g, x) = ConvGraph::new(8, 8, 3);
    let s = shape(4, 8, 1, 1, [0; 4], false);
    assert!(g
        .conv(x, s.clone(), float_conv(&mut r, &s), Epilogue::default())
        .is_err());
    let s = shape(3, 8, 1, 1, [0; 4], false);
    // An int8 conv of a float tensor, and a float conv of an int8 one.
    assert!(g
        .conv(
            x,
            s.clone(),
            int8_conv(&mut r, &s, 0.1, 0),
            Epilogue::default()
        )
        .is_err());
    let q = g.quantize(x, 0.1, 0).unwrap();
    assert!(g
        .conv(q, s.clone(), float_conv(&mut r, &s), Epilogue::default())
        .is_err());
    // A ReLU on an int8 output without dequantize.
    assert!(g
        .conv(
            q,
            s.clone(),
            int8_conv(&mut r, &s, 0.1, 0),
            Epilogue {
                act: Activation::Relu,
                ..Default::default()
            }
        )
        .is_err());
    // Too many products per output for exact f32 sums.
    let big = shape(3, 2, 1, 1, [0; 4], false);
    let mut w = int8_conv(&mut r, &big, 0.1, 0);
    if let ConvWeights::Int8 { bias, .. } = &mut w {
        bias[0] = 1 << 24;
    }
    assert!(matches!(
        g.conv(q, big, w, Epilogue::default()),
        Err(DenseError::Unsupported(_))
    ));
    assert!(g.activation(x, Activation::Clip(0.5, 6.0)).is_err());
    assert!(ConvNet::new(g.clone()).is_err(), "no outputs");
    g.output(x).unwrap();
    let net = ConvNet::new(g).unwrap();
    assert!(net.run(&[0.0; 5]).is_err());
}
