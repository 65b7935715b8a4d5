"""Calibration method and placement variants of quantize:int8 on ppocr-rec, OCR accuracy on 200
held-out lines (the figures behind the default calibration method).

    python benchmarks/quantize_calibration_methods.py > benchmarks/results/quantize_calibration_methods.txt
"""
import time

from onnxcomp import api, zoo

p = zoo.fetch('ppocr-rec')
for recipe, sets in [("quantize:int8", ["quantize.calibration=percentile"]), ("quantize:int8", ["quantize.calibration=minmax"]), ("quantize:int8", ["quantize.calibration=mse"]),
                     ("quantize:int8", ["quantize.output_qdq=none"]), ("quantize:int8", ["quantize.calibration=percentile", "quantize.percentile=99.999"]), ("quantize:int8", ["quantize.exclude=['p2o.MatMul.24']"])]:
    t=time.time()
    r = api.compress(p, recipe=recipe, calib='ppocr-rec:calib:32', eval_data='ppocr-rec:eval:200', show_progress=False, overrides=sets)
    f = r.report.fidelity
    print(sets, round(time.time()-t,1), {k: round(v.get('cosine_mean'),4) for k,v in f['outputs'].items()}, f['task']['candidate'], f['task']['reference'], flush=True)
